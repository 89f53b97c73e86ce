// Package testsrv starts presentation servers for tests and makes sure they leave nothing
// behind: no loop device, no mount, attached volume or FUSE file system, also when the test
// failed.
package testsrv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
	"github.com/rawcow/csi-rawcow/pkg/fuseuring"
)

// Start serves st from runDir. Cleanup detaches what the test left attached (and fails the
// test for it), closes the server and checks that no loop device or mount remains.
func Start(t testing.TB, st *cow.Store, runDir string) *blockdev.Server {
	t.Helper()
	return StartWith(t, st, runDir, blockdev.Options{})
}

// StartWith is Start with options. A transport asked for explicitly must be the one that
// serves: the test is skipped where the kernel lacks it.
func StartWith(t testing.TB, st *cow.Store, runDir string, opts blockdev.Options) *blockdev.Server {
	t.Helper()
	testfs.RequireRoot(t)
	if opts.Transport == blockdev.TransportIOUring {
		RequireIOUring(t)
	}
	srv, err := blockdev.NewServer(st, runDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Transport != "" && opts.Transport != blockdev.TransportAuto && srv.Transport() != opts.Transport {
		srv.Close()
		t.Fatalf("asked for transport %s, serving over %s", opts.Transport, srv.Transport())
	}
	t.Cleanup(func() { Stop(t, srv, st, runDir) })
	return srv
}

// Transports are the FUSE transports a test of the serving path runs over.
var Transports = []string{blockdev.TransportIOUring, blockdev.TransportDevFuse}

// RequireIOUring skips the test where the kernel has no FUSE-over-io-uring.
func RequireIOUring(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(fuseuring.EnableParam); err != nil {
		t.Skipf("this kernel has no FUSE-over-io-uring (Linux 6.14+, CONFIG_FUSE_IO_URING): %v", err)
	}
}

// Stop ends a server the way Start's cleanup does; for tests that stop one themselves.
func Stop(t testing.TB, srv *blockdev.Server, st *cow.Store, runDir string) {
	t.Helper()
	// Composed devices outlive a server by design: a test detaches them itself.
	if as, err := srv.List(); err == nil {
		for _, a := range as {
			if a.Composed {
				t.Errorf("%s is still attached at %s", a.Name, a.Device)
				srv.Detach(a.Name)
			}
		}
	}
	if err := srv.Close(); err != nil {
		t.Errorf("close server: %v", err)
	}
	AssertReleased(t, runDir)
	AssertReleased(t, filepath.Join(st.Dir(), "layers"))
}

// AssertReleased fails the test if a loop device serves a file under dir, or was made by a
// server of run directory dir (from any mount namespace), or a mount lies under dir, and
// releases them.
func AssertReleased(t testing.TB, dir string) {
	t.Helper()
	loops, err := blockdev.Loops(dir)
	if err != nil {
		t.Error(err)
	}
	tagged, err := blockdev.LoopsOf(dir)
	if err != nil {
		t.Error(err)
	}
	seen := map[string]bool{}
	for _, l := range append(loops, tagged...) {
		if !seen[l.Device] {
			seen[l.Device] = true
			t.Errorf("loop device %s still serves %s", l.Device, l.Backing)
			blockdev.DetachLoop(l.Device)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	lines := strings.Split(string(mounts), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if f := strings.Fields(lines[i]); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") || len(f) > 1 && f[1] == dir {
			t.Errorf("still mounted: %s", lines[i])
			unix.Unmount(f[1], unix.MNT_DETACH)
		}
	}
}

// WriteDevice writes p at off of a block device and flushes it.
func WriteDevice(t testing.TB, dev string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// ReadDevice reads n bytes at off of a block device.
func ReadDevice(t testing.TB, dev string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return buf
}

// Watchdog aborts the FUSE connection mounted at mnt if stop is not called within after.
// It runs as a separate process: a hang of the serving process's own FUSE requests can
// stop the Go runtime itself, timers and the test's deadline with it. stop ends the test
// if the watchdog had to abort.
func Watchdog(t testing.TB, mnt string, after time.Duration) (stop func()) {
	t.Helper()
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	minor := -1
	for _, m := range infos {
		if m.MountPoint == mnt && strings.HasPrefix(m.FsType, "fuse") {
			minor = m.Minor
			break
		}
	}
	if minor < 0 {
		t.Fatalf("no FUSE mount at %s", mnt)
	}
	const connections = "/sys/fs/fuse/connections"
	mounted := false
	if _, err := os.Stat(connections + "/" + strconv.Itoa(minor)); err != nil {
		if err := unix.Mount("fusectl", connections, "fusectl", 0, ""); err != nil {
			t.Fatalf("mount fusectl (needed to abort a hung connection): %v", err)
		}
		mounted = true
	}
	script := fmt.Sprintf("sleep %d && echo 1 > %s/%d/abort && echo aborted", int(after.Seconds()), connections, minor)
	cmd := exec.Command("sh", "-c", script)
	var out strings.Builder
	cmd.Stdout = &out
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true} // its sleep goes with it
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	end := func() {
		once.Do(func() {
			unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
			cmd.Wait()
			if mounted {
				unix.Unmount(connections, 0)
			}
		})
	}
	t.Cleanup(end) // also when the test ends before stop
	return func() {
		t.Helper()
		end()
		if strings.Contains(out.String(), "aborted") {
			t.Fatalf("the FUSE connection at %s hung: aborted after %v", mnt, after)
		}
	}
}
