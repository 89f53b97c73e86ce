// Command tour walks through csi-rawcow as a container orchestrator would use it, speaking
// CSI over gRPC to a running driver: a base image, three volumes over it, a snapshot and a
// restore, and what all of it costs on disk. hack/tour.sh starts the driver and runs it.
//
// Everything the tour makes it also takes away, in reverse order, failure or not.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	GiB = 1 << 30
	MiB = 1 << 20
)

func main() {
	endpoint := flag.String("endpoint", "unix:///run/csi-rawcow-tour/csi.sock", "the driver's CSI endpoint")
	bin := flag.String("bin", "csi-rawcow", "the csi-rawcow binary (for image import and image info)")
	root := flag.String("root", "/var/lib/csi-rawcow-tour", "the driver's --root")
	work := flag.String("work", "/run/csi-rawcow-tour/work", "directory for the staging and target paths")
	image := flag.String("image", "debian-like", "name of the base image the tour imports")
	flag.Parse()

	t := &tour{bin: *bin, root: *root, work: *work, image: *image}
	err := t.run(*endpoint)
	if err != nil {
		fmt.Fprintf(os.Stderr, "\ntour: %v\n", err)
	}
	if len(t.undo) > 0 {
		if err != nil {
			fmt.Println("\nCleaning up after the failure:")
		}
		if cerr := t.cleanup(); cerr != nil {
			fmt.Fprintf(os.Stderr, "tour: cleanup: %v\n", cerr)
			err = errors.Join(err, cerr)
		}
	}
	if err != nil {
		os.Exit(1)
	}
}

// tour is one run: the CSI clients, and what to undo, newest last.
type tour struct {
	bin, root, work, image string

	id   csi.IdentityClient
	ctl  csi.ControllerClient
	node csi.NodeClient
	undo []undoStep
}

type undoStep struct {
	what string
	do   func(ctx context.Context) error
}

func (t *tour) later(what string, do func(ctx context.Context) error) {
	t.undo = append(t.undo, undoStep{what, do})
}

// cleanup runs the undo steps newest first; it goes on past a failure.
func (t *tour) cleanup() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var errs []error
	for len(t.undo) > 0 {
		u := t.undo[len(t.undo)-1]
		t.undo = t.undo[:len(t.undo)-1]
		start := time.Now()
		if err := u.do(ctx); err != nil {
			fmt.Printf("    %-52s FAILED: %v\n", u.what, err)
			errs = append(errs, fmt.Errorf("%s: %w", u.what, err))
			continue
		}
		fmt.Printf("    %-52s %s\n", u.what, ms(time.Since(start)))
	}
	return errors.Join(errs...)
}

func ms(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000)
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

func step(n int, title string) { fmt.Printf("\n[%d] %s\n", n, title) }

// volume is a volume the tour made, with where it is staged and published.
type volume struct {
	name, id        string
	staging, target string
}

var mountCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

func (t *tour) run(endpoint string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	t.id, t.ctl, t.node = csi.NewIdentityClient(conn), csi.NewControllerClient(conn), csi.NewNodeClient(conn)

	step(1, "The driver, over CSI at "+endpoint)
	info, err := t.waitReady(ctx)
	if err != nil {
		return err
	}
	ni, err := t.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return fmt.Errorf("NodeGetInfo: %w", err)
	}
	fmt.Printf("    GetPluginInfo: %s %s; NodeGetInfo: node %s, topology %v\n", info.Name, info.VendorVersion, ni.NodeId, ni.AccessibleTopology.GetSegments())

	step(2, "A base image: 1 GiB raw disk with an ext4 file system and a few files, imported into the node's image store")
	if err := t.importImage(ctx); err != nil {
		return err
	}

	step(3, "Three volumes from the image (CreateVolume, parameters {baseImage: "+t.image+"})")
	var vols []*volume
	for _, name := range []string{"web-1", "web-2", "web-3"} {
		v, err := t.createVolume(ctx, name, map[string]string{"baseImage": t.image}, nil)
		if err != nil {
			return err
		}
		vols = append(vols, v)
	}
	web1 := vols[0]

	step(4, "Stage and publish web-1 (NodeStageVolume: loop device + mount; NodePublishVolume: bind mount)")
	if err := t.stage(ctx, web1); err != nil {
		return err
	}
	if err := t.publish(ctx, web1); err != nil {
		return err
	}
	if err := showFiles(web1.target); err != nil {
		return err
	}

	const before, after = "version 1: written before the snapshot\n", "version 2: written after the snapshot\n"
	step(5, "Write a file in web-1")
	if err := writeFile(filepath.Join(web1.target, "hello.txt"), []byte(before)); err != nil {
		return err
	}
	fmt.Printf("    %s/hello.txt: %q (fsync + syncfs: on the device before the snapshot)\n", web1.target, before)

	step(6, "Snapshot web-1 (CreateSnapshot: flush, freeze the top layer, new empty top; nothing copied)")
	start := time.Now()
	snap, err := t.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "web-1-snap", SourceVolumeId: web1.id})
	if err != nil {
		return fmt.Errorf("CreateSnapshot: %w", err)
	}
	snapID := snap.Snapshot.SnapshotId
	t.later("DeleteSnapshot web-1-snap", func(ctx context.Context) error {
		_, err := t.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID})
		return err
	})
	fmt.Printf("    web-1-snap -> %s, %s, ready %v, in %s\n", snapID, size(snap.Snapshot.SizeBytes), snap.Snapshot.ReadyToUse, ms(time.Since(start)))

	step(7, "Write more in web-1")
	if err := writeFile(filepath.Join(web1.target, "hello.txt"), []byte(after)); err != nil {
		return err
	}
	blob := make([]byte, 8*MiB)
	rand.NewChaCha8([32]byte{7}).Read(blob)
	if err := writeFile(filepath.Join(web1.target, "after-snapshot.bin"), blob); err != nil {
		return err
	}
	fmt.Printf("    hello.txt: %q; after-snapshot.bin: 8 MiB\n", after)

	step(8, "Restore the snapshot into a new volume (CreateVolume from the snapshot), stage it, look inside")
	restored, err := t.createVolume(ctx, "web-1-restored", nil, &csi.VolumeContentSource{
		Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}},
	})
	if err != nil {
		return err
	}
	vols = append(vols, restored)
	if err := t.stage(ctx, restored); err != nil {
		return err
	}
	got, err := os.ReadFile(filepath.Join(restored.staging, "hello.txt"))
	if err != nil {
		return err
	}
	_, statErr := os.Stat(filepath.Join(restored.staging, "after-snapshot.bin"))
	osRelease, err := os.ReadFile(filepath.Join(restored.staging, "etc", "os-release"))
	if err != nil {
		return err
	}
	ok := string(got) == before && errors.Is(statErr, fs.ErrNotExist) && bytes.Contains(osRelease, []byte("tour"))
	fmt.Printf("    web-1-restored/hello.txt: %q\n", got)
	fmt.Printf("    web-1-restored/after-snapshot.bin: %s\n", map[bool]string{true: "absent", false: "present"}[errors.Is(statErr, fs.ErrNotExist)])
	fmt.Printf("    web-1-restored/etc/os-release: from the base image (%d bytes)\n", len(osRelease))
	if !ok {
		return errors.New("the restored volume does not hold exactly the snapshot's content")
	}
	fmt.Println("    => the snapshot's content, and only it")
	if now, err := os.ReadFile(filepath.Join(web1.target, "hello.txt")); err != nil || string(now) != after {
		return fmt.Errorf("web-1 changed under the restore: %q (%v)", now, err)
	}

	step(9, "Space: what the volumes cost on disk")
	if err := t.spaceTable(vols, snapID); err != nil {
		return err
	}

	step(10, "Clean up: unpublish, unstage, delete (newest first)")
	if err := t.cleanup(); err != nil {
		return err
	}
	out, err := exec.Command(t.bin, "image", "--root", t.root, "list").CombinedOutput()
	if err != nil {
		return fmt.Errorf("image list: %v: %s", err, out)
	}
	if lines := strings.Count(strings.TrimSpace(string(out)), "\n"); lines > 0 {
		return fmt.Errorf("things are left in the store:\n%s", out)
	}
	fmt.Println("    the store and the image store are empty")
	return nil
}

// waitReady probes the driver until it answers, for up to 30 seconds.
func (t *tour) waitReady(ctx context.Context) (*csi.GetPluginInfoResponse, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		p, err := t.id.Probe(cctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && (p.Ready == nil || p.Ready.Value) {
			return t.id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the driver is not ready after 30 s: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// importImage makes a 1 GiB sparse raw disk with an ext4 file system holding a few files
// (mkfs.ext4 -d, no mount needed) and imports it with `csi-rawcow image import`.
func (t *tour) importImage(ctx context.Context) error {
	tmp, err := os.MkdirTemp(t.work, "image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	tree := filepath.Join(tmp, "tree")
	blob := make([]byte, 16*MiB)
	rand.NewChaCha8([32]byte{1}).Read(blob)
	files := map[string][]byte{
		"etc/os-release":             []byte("PRETTY_NAME=\"Debian-like tour image\"\nNAME=\"tour\"\nID=tour\n"),
		"etc/hostname":               []byte("tour\n"),
		"srv/www/index.html":         []byte("<h1>served from a volume over a shared base image</h1>\n"),
		"usr/share/tour/payload.bin": blob,
	}
	for name, data := range files {
		p := filepath.Join(tree, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			return err
		}
	}
	img := filepath.Join(tmp, "disk.raw")
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "tour", "-d", tree, img, "1G").CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	fmt.Printf("    mkfs.ext4 -d: %s, 1 GiB, %s allocated (os-release, hostname, index.html, a 16 MiB payload)\n", img, size(allocated(img)))
	cmd := []string{t.bin, "image", "import", "--root", t.root, t.image, img}
	out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(cmd, " "), err, out)
	}
	fmt.Printf("    $ csi-rawcow image import --root %s %s %s\n    %s", t.root, t.image, img, out)
	t.later("csi-rawcow image rm "+t.image, func(ctx context.Context) error {
		out, err := exec.CommandContext(ctx, t.bin, "image", "--root", t.root, "rm", t.image).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, bytes.TrimSpace(out))
		}
		return nil
	})
	return nil
}

func (t *tour) createVolume(ctx context.Context, name string, params map[string]string, src *csi.VolumeContentSource) (*volume, error) {
	start := time.Now()
	resp, err := t.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: name, Parameters: params, VolumeContentSource: src,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap},
	})
	if err != nil {
		return nil, fmt.Errorf("CreateVolume %s: %w", name, err)
	}
	v := &volume{name: name, id: resp.Volume.VolumeId,
		staging: filepath.Join(t.work, "staging", name), target: filepath.Join(t.work, "target", name)}
	t.later("DeleteVolume "+name, func(ctx context.Context) error {
		_, err := t.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id})
		return err
	})
	fmt.Printf("    %-15s -> %s, %s, in %s\n", name, v.id, size(resp.Volume.CapacityBytes), ms(time.Since(start)))
	return v, nil
}

func (t *tour) stage(ctx context.Context, v *volume) error {
	start := time.Now()
	if _, err := t.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: mountCap,
	}); err != nil {
		return fmt.Errorf("NodeStageVolume %s: %w", v.name, err)
	}
	t.later("NodeUnstageVolume "+v.name, func(ctx context.Context) error {
		_, err := t.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		return err
	})
	fmt.Printf("    staged %s: %s mounted at %s (its ext4 was there: nothing formatted), in %s\n", v.name, mountSource(v.staging), v.staging, ms(time.Since(start)))
	return nil
}

func (t *tour) publish(ctx context.Context, v *volume) error {
	start := time.Now()
	if _, err := t.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: mountCap,
	}); err != nil {
		return fmt.Errorf("NodePublishVolume %s: %w", v.name, err)
	}
	t.later("NodeUnpublishVolume "+v.name, func(ctx context.Context) error {
		_, err := t.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
		return err
	})
	fmt.Printf("    published %s at %s, in %s\n", v.name, v.target, ms(time.Since(start)))
	return nil
}

// mountSource is the device mounted at dir, from /proc/self/mounts.
func mountSource(dir string) string {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "?"
	}
	src := "?"
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			src = f[0]
		}
	}
	return src
}

// showFiles lists the regular files under dir (lost+found left out).
func showFiles(dir string) error {
	fmt.Printf("    files in %s:\n", dir)
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "lost+found" {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(dir, path)
			fmt.Printf("      %-28s %s\n", rel, size(fi.Size()))
		}
		return nil
	})
}

// writeFile writes data and makes it durable on the device: the file's data (fsync) and
// the file system's metadata (syncfs), as an application would before a snapshot.
func writeFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	return f.Close()
}

// chainInfo is what `csi-rawcow image info --json` says that the table needs.
type chainInfo struct {
	Size      int64 `json:"virtualSize"`
	Allocated int64 `json:"allocatedBytes"`
	Layers    []struct {
		ID        string `json:"id"`
		State     string `json:"state"`
		Path      string `json:"path"`
		Allocated int64  `json:"allocatedBytes"`
	} `json:"layers"`
}

func (t *tour) info(name string) (chainInfo, error) {
	var ci chainInfo
	out, err := exec.Command(t.bin, "image", "--root", t.root, "info", "--json", name).Output()
	if err != nil {
		return ci, fmt.Errorf("image info %s: %w", name, err)
	}
	return ci, json.Unmarshal(out, &ci)
}

// spaceTable prints each volume's virtual size beside the space its own top layer takes,
// the snapshot's frozen layer and the base image, each counted once, and du of the store.
func (t *tour) spaceTable(vols []*volume, snapID string) error {
	row := func(name, virtual, disk, layers, what string) {
		fmt.Printf("    %-28s %12s %10s %7s   %s\n", name, virtual, disk, layers, what)
	}
	row("", "VIRTUAL SIZE", "ON DISK", "LAYERS", "WHAT IS ON DISK")
	var virtual int64
	for _, v := range vols {
		ci, err := t.info(v.id)
		if err != nil {
			return err
		}
		virtual += ci.Size
		top := ci.Layers[len(ci.Layers)-1]
		what := "its own writes (its top layer)"
		if top.Allocated == 0 {
			what = "nothing: every read falls through to the layers below"
		}
		row("volume "+v.name, size(ci.Size), size(top.Allocated), fmt.Sprint(len(ci.Layers)), what)
	}
	ci, err := t.info(snapID)
	if err != nil {
		return err
	}
	snapLayer, base := ci.Layers[len(ci.Layers)-1], ci.Layers[0]
	row("snapshot web-1-snap", size(ci.Size), size(snapLayer.Allocated), fmt.Sprint(len(ci.Layers)), "web-1's writes before it; web-1 and web-1-restored build on it")
	row("base image "+t.image, size(ci.Size), size(base.Allocated), "1", "the image, shared by all, only ever read")
	store := duBytes(filepath.Join(t.root, "store"))
	fmt.Printf("    => %d volumes, %s of virtual disks: the store takes %s on disk (du), over one %s base image\n",
		len(vols), size(virtual), size(store), size(base.Allocated))
	out, err := exec.Command(t.bin, "image", "--root", t.root, "list").CombinedOutput()
	if err != nil {
		return fmt.Errorf("image list: %v: %s", err, out)
	}
	fmt.Printf("\n    $ csi-rawcow image --root %s list\n", t.root)
	for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Println("    " + line)
	}
	return nil
}

// duBytes is the space the files under dir take, as du counts it.
func duBytes(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			n += allocated(path)
		}
		return nil
	})
	return n
}

func allocated(path string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// size formats bytes with a binary unit: 1 GiB, 8.3 MiB, 12 KiB.
func size(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	v, u := float64(n), 0
	for v >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	if u == 0 {
		return fmt.Sprintf("%d B", n)
	}
	s := strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.1f", v), "0"), ".")
	return s + " " + units[u]
}
