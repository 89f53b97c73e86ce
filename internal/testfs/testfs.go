// Package testfs gives tests real file systems to run on: ext4, xfs and btrfs on
// loop-backed image files, and tmpfs. It needs root, loop devices and the mkfs
// tools; without them tests skip, except in CI (CI set in the environment), where
// nothing may skip and a missing prerequisite fails the test instead.
package testfs

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Skip skips the test, or fails it when CI is set in the environment (in CI
// nothing may skip).
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set, so this test may not skip: %s", msg)
		return
	}
	t.Skip(msg)
}

// RequireRoot skips (per Skip) unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (euid %d)", os.Geteuid())
	}
}

// Kinds lists the file systems tests run on: "ext4", "xfs", "btrfs", "tmpfs".
func Kinds() []string {
	return []string{"ext4", "xfs", "btrfs", "tmpfs"}
}

// minSize is the smallest image each mkfs accepts; smaller requests are raised to
// it (the image is sparse, so this costs nothing).
var minSize = map[string]int64{
	"ext4":  16 << 20,
	"xfs":   300 << 20, // mkfs.xfs refuses less since xfsprogs 5.19
	"btrfs": 256 << 20,
	"tmpfs": 1 << 20,
}

// mkfsArgs is the quiet, forced mkfs command line for an image, with 4 KiB blocks.
func mkfsArgs(kind, image string) []string {
	switch kind {
	case "ext4":
		// Without -b, mke2fs picks 1 KiB blocks for images under 512 MiB.
		return []string{"mkfs.ext4", "-q", "-F", "-b", "4096", image}
	case "xfs":
		return []string{"mkfs.xfs", "-q", "-f", image}
	case "btrfs":
		return []string{"mkfs.btrfs", "-q", "-f", image}
	}
	return nil
}

// Mount makes a fresh file system of the given kind and returns its mount point.
// ext4/xfs/btrfs: a sparse image file of size bytes (at least the mkfs minimum) in
// t.TempDir(), mkfs (quiet, force), `mount -o loop`, so the loop device is released
// at umount; tmpfs: mount -t tmpfs -o size=. t.Cleanup unmounts (retrying briefly on
// EBUSY, then a lazy umount as last resort, reported via t.Errorf) and checks that
// the loop device is gone. Skips (per Skip) when not root or when the mkfs tool is
// missing. Files opened on the file system must be closed by the test, or by
// cleanups registered after Mount (those run first).
func Mount(t testing.TB, kind string, size int64) string {
	t.Helper()
	RequireRoot(t)
	lo, ok := minSize[kind]
	if !ok {
		t.Fatalf("testfs: unknown file system kind %q (want one of %v)", kind, Kinds())
	}
	size = max(size, lo)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatalf("testfs: %v", err)
	}

	if kind == "tmpfs" {
		if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size="+strconv.FormatInt(size, 10)); err != nil {
			t.Fatalf("testfs: mount tmpfs on %s: %v", mnt, err)
		}
		t.Cleanup(func() { unmount(t, mnt, "") })
		return mnt
	}

	args := mkfsArgs(kind, "")
	if _, err := exec.LookPath(args[0]); err != nil {
		Skip(t, "testfs: %s not installed: %v", args[0], err)
	}
	if _, err := exec.LookPath("mount"); err != nil {
		Skip(t, "testfs: mount not installed: %v", err)
	}
	image := filepath.Join(dir, kind+".img")
	f, err := os.Create(image)
	if err != nil {
		t.Fatalf("testfs: %v", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("testfs: make image %s: %v", image, err)
	}
	run(t, mkfsArgs(kind, image)...)
	run(t, "mount", "-t", kind, "-o", "loop", image, mnt)
	t.Cleanup(func() { unmount(t, mnt, image) })
	return mnt
}

// run runs a command, failing the test with its output when it fails.
func run(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("testfs: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// busyRetries is how many times unmount retries on EBUSY, 100 ms apart.
var busyRetries = 50

// unmount unmounts mnt, retrying for a while on EBUSY and falling back to a lazy
// unmount, then (for an image) waits for its loop device to be released.
func unmount(t testing.TB, mnt, image string) {
	t.Helper()
	var err error
	for i := 0; i < busyRetries; i++ {
		if i > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		if err = unix.Unmount(mnt, 0); !errors.Is(err, unix.EBUSY) {
			break
		}
	}
	if errors.Is(err, unix.EBUSY) {
		lerr := unix.Unmount(mnt, unix.MNT_DETACH)
		t.Errorf("testfs: umount %s: still busy after %d tries (files left open?); lazy umount: %v", mnt, busyRetries, lerr)
		return // the loop device stays until the last user goes away
	}
	if err != nil {
		t.Errorf("testfs: umount %s: %v", mnt, err)
		return
	}
	if image == "" {
		return
	}
	var out []byte
	for i := 0; i < 50; i++ {
		out, err = exec.Command("losetup", "-j", image).CombinedOutput()
		if err == nil && len(strings.TrimSpace(string(out))) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("testfs: loop device of %s not released after umount: %v\n%s", image, err, out)
}

// SetExtentSizeHint sets an inheritable XFS extent size hint on directory dir
// (xfs_io -c "extsize N"): files created in dir afterwards inherit it.
func SetExtentSizeHint(t testing.TB, dir string, bytes int64) {
	t.Helper()
	if _, err := exec.LookPath("xfs_io"); err != nil {
		Skip(t, "testfs: xfs_io not installed: %v", err)
	}
	run(t, "xfs_io", "-c", "extsize "+strconv.FormatInt(bytes, 10), dir)
}
