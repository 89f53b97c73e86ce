package testfs

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var magic = map[string]int64{
	"ext4":  unix.EXT4_SUPER_MAGIC,
	"xfs":   unix.XFS_SUPER_MAGIC,
	"btrfs": unix.BTRFS_SUPER_MAGIC,
	"tmpfs": unix.TMPFS_MAGIC,
}

func TestMount(t *testing.T) {
	for _, kind := range Kinds() {
		var mnt string
		ok := t.Run(kind, func(t *testing.T) {
			mnt = Mount(t, kind, 64<<20)
			var st unix.Statfs_t
			if err := unix.Statfs(mnt, &st); err != nil {
				t.Fatal(err)
			}
			if int64(st.Type) != magic[kind] {
				t.Fatalf("statfs type %#x, want %#x", st.Type, magic[kind])
			}
			if st.Bsize != 4096 {
				t.Errorf("block size %d, want 4096", st.Bsize)
			}
			p := filepath.Join(mnt, "f")
			if err := os.WriteFile(p, []byte("hello"), 0o600); err != nil {
				t.Fatal(err)
			}
			if got, err := os.ReadFile(p); err != nil || string(got) != "hello" {
				t.Fatalf("read back %q, %v", got, err)
			}
		})
		if !ok || mnt == "" {
			continue
		}
		// The cleanup of the subtest has run: nothing may be left mounted or attached.
		if mounts, err := os.ReadFile("/proc/mounts"); err != nil {
			t.Fatal(err)
		} else if bytes.Contains(mounts, []byte(" "+mnt+" ")) {
			t.Errorf("%s: %s still mounted", kind, mnt)
		}
		if kind != "tmpfs" {
			image := filepath.Join(filepath.Dir(mnt), kind+".img")
			out, err := exec.Command("losetup", "-j", image).CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != "" {
				t.Errorf("%s: losetup -j %s: %v %q", kind, image, err, out)
			}
		}
	}
}

func TestExtentSizeHint(t *testing.T) {
	mnt := Mount(t, "xfs", 0)
	dir := filepath.Join(mnt, "d")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	SetExtentSizeHint(t, dir, 1<<20)
	out, err := exec.Command("xfs_io", "-c", "extsize", dir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "[1048576]") {
		t.Fatalf("xfs_io extsize %s: %v %q", dir, err, out)
	}
}

// recorder is a testing.TB that records Skip, Fatal and Errorf instead of acting
// on them, and collects cleanups for the test to run.
type recorder struct {
	testing.TB
	skipped, failed, errored string
	cleanups                 []func()
}

func (r *recorder) Helper()                           {}
func (r *recorder) Skip(args ...any)                  { r.skipped = fmt.Sprint(args...) }
func (r *recorder) Fatalf(format string, args ...any) { r.failed = fmt.Sprintf(format, args...) }
func (r *recorder) Errorf(format string, args ...any) { r.errored += fmt.Sprintf(format, args...) }
func (r *recorder) Cleanup(f func())                  { r.cleanups = append(r.cleanups, f) }

func (r *recorder) runCleanups() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.cleanups = nil
}

// TestUnmountBusy leaves a file open at cleanup: the cleanup must report it, fall
// back to a lazy umount, and the loop device must go once the file is closed.
func TestUnmountBusy(t *testing.T) {
	RequireRoot(t)
	defer func(n int) { busyRetries = n }(busyRetries)
	busyRetries = 2
	r := &recorder{TB: t}
	mnt := Mount(r, "ext4", 0)
	if r.failed != "" || r.skipped != "" {
		t.Fatalf("Mount: failed %q, skipped %q", r.failed, r.skipped)
	}
	f, err := os.Create(filepath.Join(mnt, "open"))
	if err != nil {
		r.runCleanups()
		t.Fatal(err)
	}
	r.runCleanups()
	f.Close()
	if !strings.Contains(r.errored, "still busy") {
		t.Errorf("cleanup reported %q, want a busy error", r.errored)
	}
	if mounts, err := os.ReadFile("/proc/mounts"); err != nil || bytes.Contains(mounts, []byte(" "+mnt+" ")) {
		t.Errorf("%s still mounted after lazy umount (%v)", mnt, err)
	}
	image := filepath.Join(filepath.Dir(mnt), "ext4.img")
	var out []byte
	for i := 0; i < 50; i++ {
		if out, err = exec.Command("losetup", "-j", image).CombinedOutput(); err == nil && len(bytes.TrimSpace(out)) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("loop device of %s not released after the last file closed: %v %q", image, err, out)
}

func TestSkip(t *testing.T) {
	t.Setenv("CI", "")
	r := &recorder{TB: t}
	Skip(r, "no %s", "tool")
	if r.skipped != "no tool" || r.failed != "" {
		t.Errorf("without CI: skipped %q, failed %q", r.skipped, r.failed)
	}
	t.Setenv("CI", "true")
	r = &recorder{TB: t}
	Skip(r, "no %s", "tool")
	if r.skipped != "" || !strings.Contains(r.failed, "no tool") {
		t.Errorf("with CI: skipped %q, failed %q", r.skipped, r.failed)
	}
}
