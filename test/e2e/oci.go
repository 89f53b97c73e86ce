//go:build e2e

package e2e

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// No registry is reachable here: images are OCI layouts made from directories and imported
// into containerd's k8s.io namespace; pods find them with imagePullPolicy IfNotPresent.

// layerFromDir tars a root file system directory into a layer file (GNU tar keeps hard
// links, devices, modes; owners are numeric, times are zeroed for stable digests).
func layerFromDir(dir, out string, exclude ...string) error {
	args := []string{"--sort=name", "--mtime=@0", "--numeric-owner", "--xattrs", "-C", dir}
	for _, e := range exclude {
		args = append(args, "--exclude="+e)
	}
	args = append(args, "-cf", out, ".")
	if b, err := exec.Command("tar", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("tar %s: %v: %s", dir, err, b)
	}
	return nil
}

// layerFromFiles writes a layer of the given files: path in the image -> file on the host.
func layerFromFiles(out string, files map[string]string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	dirs := map[string]bool{}
	for dst := range files {
		for d := filepath.Dir(strings.TrimPrefix(dst, "/")); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	sorted := make([]string, 0, len(dirs))
	for d := range dirs {
		sorted = append(sorted, d)
	}
	sort.Strings(sorted) // parents first
	for _, d := range sorted {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	for dst, src := range files {
		st, err := os.Stat(src)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(dst, "/"),
			Mode: int64(st.Mode().Perm()), Size: st.Size(), Format: tar.FormatPAX}); err != nil {
			return err
		}
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		_, err = io.Copy(tw, in)
		in.Close()
		if err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

type ociImage struct {
	Name       string   // registry.k8s.io/pause:3.10
	Layers     []string // layer tar files, bottom first
	Entrypoint []string
	Cmd        []string
	User       string
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Platform    map[string]string `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// writeOCI makes an OCI image layout tarball of img at out, for `ctr images import`.
func writeOCI(img ociImage, out string) error {
	dir, err := os.MkdirTemp(filepath.Dir(out), ".oci-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return err
	}
	addBlob := func(src string, data []byte) (string, int64, error) {
		h := sha256.New()
		var size int64
		if src != "" {
			f, err := os.Open(src)
			if err != nil {
				return "", 0, err
			}
			defer f.Close()
			if size, err = io.Copy(h, f); err != nil {
				return "", 0, err
			}
		} else {
			h.Write(data)
			size = int64(len(data))
		}
		d := hex.EncodeToString(h.Sum(nil))
		dst := filepath.Join(blobs, d)
		if src != "" {
			if err := os.Link(src, dst); err != nil && !os.IsExist(err) {
				if b, err := exec.Command("cp", "--reflink=auto", src, dst).CombinedOutput(); err != nil {
					return "", 0, fmt.Errorf("cp: %v: %s", err, b)
				}
			}
		} else if err := os.WriteFile(dst, data, 0o644); err != nil {
			return "", 0, err
		}
		return "sha256:" + d, size, nil
	}
	var layers []descriptor
	var diffIDs []string
	for _, l := range img.Layers {
		d, size, err := addBlob(l, nil)
		if err != nil {
			return err
		}
		layers = append(layers, descriptor{MediaType: "application/vnd.oci.image.layer.v1.tar", Digest: d, Size: size})
		diffIDs = append(diffIDs, d) // uncompressed: the diff ID is the digest
	}
	cfg := map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{
			"Env":        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"Entrypoint": img.Entrypoint, "Cmd": img.Cmd, "User": img.User,
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
	}
	cfgJSON, _ := json.Marshal(cfg)
	cd, cs, err := addBlob("", cfgJSON)
	if err != nil {
		return err
	}
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": descriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: cd, Size: cs},
		"layers": layers,
	})
	md, ms, err := addBlob("", manifest)
	if err != nil {
		return err
	}
	ref := img.Name[strings.LastIndex(img.Name, ":")+1:]
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
		"manifests": []descriptor{{MediaType: "application/vnd.oci.image.manifest.v1+json", Digest: md, Size: ms,
			Platform:    map[string]string{"architecture": "amd64", "os": "linux"},
			Annotations: map[string]string{"io.containerd.image.name": img.Name, "org.opencontainers.image.ref.name": ref}}},
	})
	if err := os.WriteFile(filepath.Join(dir, "index.json"), index, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return err
	}
	if b, err := exec.Command("tar", "-C", dir, "-cf", out, "oci-layout", "index.json", "blobs").CombinedOutput(); err != nil {
		return fmt.Errorf("tar: %v: %s", err, b)
	}
	return nil
}
