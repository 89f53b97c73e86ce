package blockdev_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// requireTools skips (fails in CI) unless root and the named programs exist.
func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	testfs.RequireRoot(t)
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			testfs.Skip(t, "%s is not installed (apt-get install %s)", tool, tool)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// storeWithVolume opens a store in a new directory with one volume, "vol", made with opts.
func storeWithVolume(t testing.TB, opts cow.CreateOptions) *cow.Store {
	t.Helper()
	st, err := cow.OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", opts); err != nil {
		t.Fatal(err)
	}
	return st
}

// startServer serves st from a fresh run directory (see testsrv.Start).
func startServer(t testing.TB, st *cow.Store) *blockdev.Server {
	t.Helper()
	return testsrv.Start(t, st, t.TempDir())
}

// assertReleased fails the test if a loop device or mount under dir remains.
func assertReleased(t testing.TB, dir string) { testsrv.AssertReleased(t, dir) }

// mountDev mounts dev at a new directory; cleanup unmounts it unless the test did.
func mountDev(t testing.TB, dev string, opts ...string) string {
	t.Helper()
	mnt := t.TempDir()
	args := append(opts, dev, mnt)
	run(t, "mount", args...)
	t.Cleanup(func() { unix.Unmount(mnt, 0) })
	return mnt
}

func sha(data []byte) string { s := sha256.Sum256(data); return fmt.Sprintf("%x", s) }

func fileSHA(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha(data)
}

// writeTree writes n files of pseudo-random content under dir and returns their checksums.
func writeTree(t testing.TB, dir string, n int, seed uint64) map[string]string {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	sums := map[string]string{}
	for i := 0; i < n; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("d%d", i%7))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		data := make([]byte, 1+r.IntN(300<<10))
		for j := range data {
			data[j] = byte(r.Uint32())
		}
		path := filepath.Join(sub, fmt.Sprintf("f%d-%d", seed, i))
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(dir, path)
		sums[rel] = sha(data)
	}
	return sums
}

func checkTree(t testing.TB, dir string, sums map[string]string) {
	t.Helper()
	for rel, want := range sums {
		if got := fileSHA(t, filepath.Join(dir, rel)); got != want {
			t.Errorf("%s: checksum %s, want %s", rel, got, want)
		}
	}
}

// makeBase writes a base image of size bytes with data in every other MiB.
func makeBase(t testing.TB, dir string, size int64) string {
	t.Helper()
	path := filepath.Join(dir, "base.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := bytes.Repeat([]byte("csi-rawcow base "), 1<<16)
	for off := int64(0); off < size; off += 2 << 20 {
		if _, err := f.WriteAt(chunk[:min(int64(len(chunk)), size-off)], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestLiveSnapshotOfMountedFilesystem runs ext4 and xfs on attached volumes, snapshots them
// while mounted and busy, and checks the snapshot: through the merged view on the root
// file system (ext4: no reflink), and composed on xfs and btrfs stores.
func TestLiveSnapshotOfMountedFilesystem(t *testing.T) {
	requireTools(t, "mkfs.ext4", "mkfs.xfs", "mount")
	for _, store := range []string{"ext4-merged", "xfs-composed", "btrfs-composed"} {
		for _, fsType := range []string{"ext4", "xfs"} {
			t.Run(store+"/"+fsType, func(t *testing.T) { liveSnapshotCheck(t, store, fsType) })
		}
	}
}

func liveSnapshotCheck(t *testing.T, store, fsType string) {
	dir := t.TempDir()
	composed := strings.HasSuffix(store, "composed")
	if composed {
		dir = testfs.Mount(t, strings.TrimSuffix(store, "-composed"), 2<<30)
	}
	base := makeBase(t, dir, 64<<20) // on the store's file system, as an imported image is
	baseSum := fileSHA(t, base)
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", cow.CreateOptions{Base: base, Size: 512 << 20}); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, st)
	a, err := srv.Attach("vol", blockdev.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if a.Composed != composed {
		t.Fatalf("attached composed=%v on a %s store, want %v", a.Composed, store, composed)
	}
	run(t, "mkfs."+fsType, "-q", a.Device)
	mnt := mountDev(t, a.Device)
	before := writeTree(t, mnt, 150, 1)
	unix.Sync()
	start := time.Now()
	if err := srv.Snapshot("vol", "snap", nil); err != nil {
		t.Fatal(err)
	}
	t.Logf("live snapshot of a mounted %s volume on a %s store: %v", fsType, store, time.Since(start))
	after := writeTree(t, mnt, 100, 2)
	// Rewrite files the snapshot holds: the snapshot must keep the old content.
	for rel := range before {
		if err := os.WriteFile(filepath.Join(mnt, rel), []byte("changed after the snapshot"), 0o644); err != nil {
			t.Fatal(err)
		}
		break
	}
	unix.Sync()
	checkTree(t, mnt, after)
	run(t, "umount", mnt)

	// The snapshot is crash-consistent at block level: attached read-only, its
	// bytes are those of a clone of it, which mounts with log recovery and holds
	// exactly what was synced before the snapshot.
	snap, err := srv.Attach("snap", blockdev.AttachOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	// A snapshot is read-only whatever is asked, when attached and when attached again.
	if again, err := srv.Attach("snap", blockdev.AttachOptions{}); err != nil || again.Device != snap.Device || !again.ReadOnly {
		t.Fatalf("the snapshot attached again without asking for read-only: %+v, %v", again, err)
	}
	snapSum := fileSHA(t, snap.Device)
	if err := srv.Clone("snap", "restored", nil); err != nil {
		t.Fatal(err)
	}
	restored, err := srv.Attach("restored", blockdev.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := fileSHA(t, restored.Device); got != snapSum {
		t.Fatalf("a clone of the snapshot reads differently from the snapshot")
	}
	rmnt := mountDev(t, restored.Device, "-o", map[string]string{"ext4": "rw", "xfs": "rw,nouuid"}[fsType])
	checkTree(t, rmnt, before)
	for rel := range after {
		if _, err := os.Stat(filepath.Join(rmnt, rel)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s, written after the snapshot, is in it (%v)", rel, err)
		}
	}
	run(t, "umount", rmnt)
	if fsType == "ext4" { // ext4 mounts a read-only device without replaying its journal
		smnt := mountDev(t, snap.Device, "-o", "ro,noload")
		checkTree(t, smnt, before)
		run(t, "umount", smnt)
	}
	if got := fileSHA(t, snap.Device); got != snapSum {
		t.Errorf("the snapshot changed while a clone of it was used")
	}
	for _, name := range []string{"snap", "vol", "restored"} {
		if err := srv.Detach(name); err != nil {
			t.Fatal(err)
		}
	}
	if got := fileSHA(t, base); got != baseSum {
		t.Errorf("the base changed: %s, was %s", got, baseSum)
	}
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		t.Errorf("check: %v %v", err, probs)
	}
}

// TestAttachedChainIsLocked: nothing changes an attached chain behind the server's back;
// the control socket goes through the server.
func TestAttachedChainIsLocked(t *testing.T) {
	requireTools(t)
	dir := t.TempDir()
	st, err := cow.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", cow.CreateOptions{Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, st)
	if _, err := srv.Attach("vol", blockdev.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	other, err := cow.OpenStore(dir) // another process's view of the same store
	if err != nil {
		t.Fatal(err)
	}
	for what, err := range map[string]error{
		"snapshot": other.Snapshot("vol", "s1", nil),
		"resize":   other.Resize("vol", 32<<20),
		"delete":   other.DeleteVolume("vol"),
		"clone":    other.Clone("vol", "c1", nil),
	} {
		if !errors.Is(err, cow.ErrBusy) {
			t.Errorf("%s of an attached volume from another store handle: %v, want ErrBusy", what, err)
		}
	}
	if _, err := other.Open("vol", cow.OpenOptions{}); !errors.Is(err, cow.ErrBusy) {
		t.Errorf("open of an attached volume: %v, want ErrBusy", err)
	}
	l, err := srv.ServeControl()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := blockdev.Dial(filepath.Dir(srv.MountDir()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Snapshot("vol", "s1", nil); err != nil {
		t.Fatalf("snapshot through the server: %v", err)
	}
	if err := c.Resize("vol", 32<<20); err != nil {
		t.Fatalf("resize through the server: %v", err)
	}
	if err := c.Snapshot("vol", "s1", nil); !errors.Is(err, cow.ErrExists) {
		t.Errorf("second snapshot with the same name: %v, want ErrExists", err)
	}
	as, err := c.List()
	if err != nil || len(as) != 1 || as[0].Name != "vol" {
		t.Fatalf("list: %v %+v", err, as)
	}
	if got := deviceSize(t, as[0].Device); got != 32<<20 {
		t.Errorf("device size after resize: %d, want %d", got, 32<<20)
	}
	if err := c.Detach("vol"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(as[0].Device); err == nil {
		if loops, _ := blockdev.Loops(srv.MountDir()); len(loops) > 0 {
			t.Errorf("loop devices left after detach: %+v", loops)
		}
	}
}

func deviceSize(t testing.TB, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		t.Fatal(err)
	}
	return int64(n)
}

// TestAttachAfterClose: an attach that reaches the server once Close has begun (it decided
// its presentation before) is refused and leaves nothing behind.
func TestAttachAfterClose(t *testing.T) {
	testfs.RequireRoot(t)
	st := storeWithVolume(t, cow.CreateOptions{Size: 16 << 20})
	runDir := t.TempDir()
	srv, err := blockdev.NewServer(st, runDir, blockdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Attach("vol", blockdev.AttachOptions{Presentation: blockdev.PresentMerged}); !errors.Is(err, blockdev.ErrServerClosed) {
		t.Fatalf("attach after Close: %v, want ErrServerClosed", err)
	}
	assertReleased(t, runDir)
}
