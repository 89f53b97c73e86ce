//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"go.yaml.in/yaml/v3"
)

const (
	busyboxImage = "docker.io/library/busybox:e2e"
	rawcowImage  = "ghcr.io/rawcow/csi-rawcow:e2e"
)

const pauseSource = `package main

import (
	"os"
	"os/signal"
	"syscall"
)

// pause: the pod sandbox's process; sleeps, reaps, exits on SIGINT/SIGTERM.
func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
`

// buildBaseImages makes and imports the pod sandbox (pause) and busybox for the test pods;
// it returns busybox's layer, the base of the sidecar images.
func buildBaseImages(n *node) (string, error) {
	dir := filepath.Join(n.work, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	src := filepath.Join(dir, "pause-src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(pauseSource), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module pause\n\ngo 1.22\n"), 0o644); err != nil {
		return "", err
	}
	pause := filepath.Join(dir, "pause")
	if err := goBuild(src, pause, "."); err != nil {
		return "", err
	}
	pauseLayer := filepath.Join(dir, "pause.layer")
	if err := layerFromFiles(pauseLayer, map[string]string{"/pause": pause}); err != nil {
		return "", err
	}
	bb := filepath.Join(dir, "busybox-root")
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return "", fmt.Errorf("busybox not found (apt-get install busybox-static): %w", err)
	}
	if err := makeBusyboxRoot(busybox, bb); err != nil {
		return "", err
	}
	bbLayer := filepath.Join(dir, "busybox.layer")
	if err := layerFromDir(bb, bbLayer); err != nil {
		return "", err
	}
	return bbLayer, importImages(n, dir, []ociImage{
		{Name: pauseImage, Layers: []string{pauseLayer}, Entrypoint: []string{"/pause"}},
		{Name: busyboxImage, Layers: []string{bbLayer}, Cmd: []string{"/bin/sh"}},
	})
}

// buildDriverImages makes and imports the sidecars from the cached binaries, under the names
// and tags deploy/kubernetes/kustomization.yaml gives them, and csi-rawcow: the Dockerfile's
// runtime (a Debian root with its packages, from build-k8s.sh rootfs) plus a static binary of
// this tree.
func buildDriverImages(n *node, paths map[string]string, repo, bbLayer string) error {
	dir := filepath.Join(n.work, "images")
	var images []ociImage
	kimages, err := kustomizeImages(filepath.Join(repo, "deploy", "kubernetes", "kustomization.yaml"))
	if err != nil {
		return err
	}
	for _, name := range []string{"csi-provisioner", "csi-snapshotter", "csi-resizer", "snapshot-controller"} {
		ref, ok := kimages["registry.k8s.io/sig-storage/"+name]
		if !ok {
			return fmt.Errorf("kustomization.yaml has no image registry.k8s.io/sig-storage/%s", name)
		}
		bin := filepath.Join(paths["SIDECARS_BIN"], name)
		if out, err := exec.Command(bin, "--version").CombinedOutput(); err != nil || !strings.HasSuffix(strings.TrimSpace(string(out)), ref[strings.LastIndex(ref, ":")+1:]) {
			return fmt.Errorf("%s --version = %q (%v), the kustomization deploys %s: rebuild the cache or fix the tag", bin, out, err, ref)
		}
		layer := filepath.Join(dir, name+".layer")
		if err := layerFromFiles(layer, map[string]string{"/" + name: bin}); err != nil {
			return err
		}
		images = append(images, ociImage{Name: ref, Layers: []string{bbLayer, layer}, Entrypoint: []string{"/" + name}})
	}
	bin := filepath.Join(dir, "csi-rawcow")
	if err := goBuild(repo, bin, "./cmd/csi-rawcow"); err != nil {
		return err
	}
	binLayer := filepath.Join(dir, "csi-rawcow.layer")
	if err := layerFromFiles(binLayer, map[string]string{"/usr/local/bin/csi-rawcow": bin}); err != nil {
		return err
	}
	images = append(images, ociImage{Name: rawcowImage, Layers: []string{paths["ROOTFS_LAYER"], binLayer},
		Entrypoint: []string{"/usr/local/bin/csi-rawcow"}, Cmd: []string{"driver"}})
	return importImages(n, dir, images)
}

func importImages(n *node, dir string, images []ociImage) error {
	for _, img := range images {
		tarball := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(img.Name)+".tar")
		if err := writeOCI(img, tarball); err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		if err := n.importImage(tarball); err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		os.Remove(tarball)
	}
	return nil
}

// goBuild builds a static binary like the Dockerfile does.
func goBuild(dir, out, pkg string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w -X main.version=e2e", "-o", out, pkg)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

func makeBusyboxRoot(busybox, root string) error {
	for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev", "root", "usr"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
		return err
	}
	if b, err := exec.Command("cp", busybox, filepath.Join(root, "bin", "busybox")).CombinedOutput(); err != nil {
		return fmt.Errorf("cp busybox: %v: %s", err, b)
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return err
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil && !os.IsExist(err) {
			return err
		}
	}
	for _, l := range [][2]string{{"../bin", "usr/bin"}, {"bin", "sbin"}, {"../bin", "usr/sbin"}} {
		if err := os.Symlink(l[0], filepath.Join(root, l[1])); err != nil && !os.IsExist(err) {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(root, "etc", "group"), []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
}

// kustomizeImages maps each image name of a kustomization's images: section to name:tag.
func kustomizeImages(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var k struct {
		Images []struct {
			Name    string `yaml:"name"`
			NewName string `yaml:"newName"`
			NewTag  string `yaml:"newTag"`
		} `yaml:"images"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := map[string]string{}
	for _, im := range k.Images {
		name := im.NewName
		if name == "" {
			name = im.Name
		}
		out[im.Name] = name + ":" + im.NewTag
	}
	return out, nil
}

// buildConformanceImages makes and imports the images the External Storage specs run, under
// the tags e2e.test v1.34.4 asks for (test/utils/image/manifest.go): pods pull IfNotPresent,
// so an imported tag is used as is. busybox and nginx are busybox (the storage specs run only
// sh, dd, ls and the like in them); jessie-dnsutils is a Debian root like the real one (the
// driver image's, build-k8s.sh rootfs): the specs use its GNU dd (oflag=nocache, which
// busybox lacks); agnhost is the real one.
func buildConformanceImages(n *node, bbLayer, debianLayer, agnhost string) error {
	dir := filepath.Join(n.work, "images")
	agnLayer := filepath.Join(dir, "agnhost.layer")
	if err := layerFromFiles(agnLayer, map[string]string{"/agnhost": agnhost}); err != nil {
		return err
	}
	const e2eImages = "registry.k8s.io/e2e-test-images/"
	sh := []string{"/bin/sh"}
	return importImages(n, dir, []ociImage{
		{Name: "registry.k8s.io/pause:3.10.1", Layers: []string{filepath.Join(dir, "pause.layer")}, Entrypoint: []string{"/pause"}},
		{Name: e2eImages + "busybox:1.37.0-1", Layers: []string{bbLayer}, Cmd: sh},
		{Name: e2eImages + "nginx:1.14-4", Layers: []string{bbLayer}, Cmd: sh},
		{Name: e2eImages + "jessie-dnsutils:1.7", Layers: []string{debianLayer}, Cmd: sh},
		{Name: e2eImages + "agnhost:2.56", Layers: []string{bbLayer, agnLayer}, Entrypoint: []string{"/agnhost"}},
	})
}
