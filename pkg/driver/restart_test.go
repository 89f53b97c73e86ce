package driver

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// The restart tests run the real binary: `csi-rawcow serve` and `csi-rawcow driver
// --server external` as child processes, built once per test process.
var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// rawcowBinary builds cmd/csi-rawcow once into a temp directory (removed by TestMain).
func rawcowBinary(t testing.TB) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, err := os.Stat(goTool); err != nil {
			testfs.Skip(t, "no go tool to build csi-rawcow: %v", err)
		}
	}
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "csi-rawcow-bin-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "csi-rawcow")
		out, err := exec.Command(goTool, "build", "-o", binPath, "github.com/rawcow/csi-rawcow/cmd/csi-rawcow").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// child is a process of the test, its output in a log file.
type child struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // the exit status, once done is closed
}

func startChild(t testing.TB, logDir, name string, args ...string) *child {
	t.Helper()
	logPath := filepath.Join(logDir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatal(err)
	}
	c := &child{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	return c
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL and waits for the process to go.
func (c *child) kill() {
	c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

// term sends SIGTERM and returns the exit status; after timeout it kills.
func (c *child) term(timeout time.Duration) error {
	if c.exited() {
		return fmt.Errorf("%s had exited already: %v", c.name, c.err)
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return c.err
	case <-time.After(timeout):
		c.kill()
		return fmt.Errorf("%s did not exit within %v of SIGTERM", c.name, timeout)
	}
}

func (c *child) tail() string {
	b, _ := os.ReadFile(c.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// rig is a node: a server process, a driver process over it, and temp directories for
// the root, the run directory, the socket, staging and target paths.
type rig struct {
	t                   testing.TB
	bin                 string
	root, run, sock     string
	pods, logs          string // staging and target paths live under pods
	server, driver      *child
	c                   *csiConn
	restarts            int
	killedDuringRPC     int
	completedBeforeKill int
}

func newRig(t testing.TB) *rig {
	t.Helper()
	testfs.RequireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "mount", "umount", "blkid"} {
		if _, err := exec.LookPath(tool); err != nil {
			testfs.Skip(t, "%s not installed: %v", tool, err)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testfs.Skip(t, "no /dev/fuse: %v", err)
	}
	r := &rig{t: t, bin: rawcowBinary(t), root: t.TempDir(), run: t.TempDir(), pods: t.TempDir(), logs: t.TempDir()}
	r.sock = filepath.Join(t.TempDir(), "csi.sock")
	// Whatever a failure leaves behind goes, pass or fail: processes, mounts, loop devices.
	t.Cleanup(r.cleanup)
	r.server = startChild(t, r.logs, "serve", r.bin, "serve", "--store", filepath.Join(r.root, "store"), "--run-dir", r.run)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := blockdev.Dial(r.run); err == nil {
			c.Close()
			break
		}
		if r.server.exited() || time.Now().After(deadline) {
			t.Fatalf("the server did not start: %v\n%s", r.server.err, r.server.tail())
		}
		time.Sleep(10 * time.Millisecond)
	}
	r.startDriver()
	return r
}

func (r *rig) startDriver() {
	r.t.Helper()
	r.driver = startChild(r.t, r.logs, "driver", r.bin, "driver", "--server", "external", "--root", r.root,
		"--run-dir", r.run, "--endpoint", "unix://"+r.sock, "--nodeid", "n1")
	// The old socket file stays after a kill: wait until the new process answers.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if r.driver.exited() || time.Now().After(deadline) {
			r.t.Fatalf("the driver did not start: %v\n%s", r.driver.err, r.driver.tail())
		}
		if conn, err := net.DialTimeout("unix", r.sock, time.Second); err == nil {
			conn.Close()
			c := dialCSI(r.t, r.sock)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := c.id.Probe(ctx, &csi.ProbeRequest{})
			cancel()
			if err == nil {
				r.c = c
				return
			}
			c.conn.Close()
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// restartDriver kills the driver with SIGKILL and starts it again with the same flags.
func (r *rig) restartDriver() {
	r.t.Helper()
	r.driver.kill()
	if r.c != nil {
		r.c.conn.Close()
	}
	r.restarts++
	r.startDriver()
}

func (r *rig) cleanup() {
	t := r.t
	if r.driver != nil && !r.driver.exited() {
		r.driver.kill()
	}
	for _, dir := range []string{r.pods, r.root} {
		for _, m := range mountsUnder(t, dir) {
			t.Errorf("left mounted: %s", m)
		}
		sweepMountsQuiet(t, dir)
	}
	if r.server != nil && !r.server.exited() {
		if err := r.server.term(30 * time.Second); err != nil {
			t.Errorf("server: %v\n%s", err, r.server.tail())
		}
	}
	if loops, _ := blockdev.Loops(r.run); len(loops) > 0 {
		t.Errorf("loop devices left: %+v", loops)
		for _, l := range loops {
			blockdev.DetachLoop(l.Device)
		}
	}
	for _, m := range mountsUnder(t, r.run) {
		t.Errorf("left mounted: %s", m)
	}
	sweepMountsQuiet(t, r.run)
	if t.Failed() {
		for _, c := range []*child{r.server, r.driver} {
			if c != nil {
				t.Logf("%s log tail:\n%s", c.name, c.tail())
			}
		}
	}
}

// sweepMountsQuiet lazily unmounts whatever is mounted under dir, the last mounted first.
func sweepMountsQuiet(t testing.TB, dir string) {
	for pass := 0; pass < 5; pass++ {
		ms := mountsUnder(t, dir)
		if len(ms) == 0 {
			return
		}
		for i := len(ms) - 1; i >= 0; i-- {
			unix.Unmount(ms[i], unix.MNT_DETACH)
		}
	}
}

// binaryProcesses lists the live processes running our binary.
func binaryProcesses(bin string) []string {
	entries, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.TrimSuffix(exe, " (deleted)") == bin {
			cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			out = append(out, e.Name()+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return out
}

// childProcesses lists the live children of this test process.
func childProcesses() []string {
	entries, _ := os.ReadDir("/proc")
	var out []string
	me := strconv.Itoa(os.Getpid())
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so cut after the last ')'.
		s := string(b)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(fields) > 1 && fields[1] == me && fields[0] != "Z" {
			out = append(out, e.Name()+" "+s[:strings.LastIndexByte(s, ')')+1])
		}
	}
	return out
}

func (r *rig) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Minute)
}

func (r *rig) createVolume(name string, c *csi.VolumeCapability, size int64) string {
	r.t.Helper()
	ctx, cancel := r.ctx()
	defer cancel()
	resp, err := r.c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{c}, CapacityRange: capacity(size, 0)})
	if err != nil {
		r.t.Fatalf("create %s: %v", name, err)
	}
	return resp.Volume.VolumeId
}

func statfs(t testing.TB, path string) unix.Statfs_t {
	t.Helper()
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		t.Fatal(err)
	}
	return fs
}

// TestDriverRestart kills the driver (SIGKILL) while a mount volume (ext4) and a block
// volume are staged and published, with data written, and starts it again: the server
// process keeps the devices, and the new driver answers stats, expands both (the file
// system grows online, statfs shows it; the block device grows), finds the data, unpublishes,
// unstages and deletes; afterwards no loop device, mount or process is left, and the server
// exits 0 on SIGTERM.
func TestDriverRestart(t *testing.T) {
	for _, fsType := range []string{"ext4", "xfs"} {
		t.Run(fsType, func(t *testing.T) { testDriverRestart(t, fsType) })
	}
}

// hasCapability reports whether this process has capability bit c in its effective set.

func testDriverRestart(t *testing.T, fsType string) {
	mkfs := map[string]string{"ext4": "mkfs.ext4", "xfs": "mkfs.xfs"}[fsType]
	grow := map[string]string{"ext4": "resize2fs", "xfs": "xfs_growfs"}[fsType]
	for _, tool := range []string{mkfs, grow} {
		if _, err := exec.LookPath(tool); err != nil {
			testfs.Skip(t, "%s not installed: %v", tool, err)
		}
	}
	// ext4 grows online through EXT4_IOC_RESIZE_FS, which needs CAP_SYS_RESOURCE: without
	// it NodeExpandVolume must say so (FailedPrecondition naming the capability).
	growFS := fsType != "ext4" || hasCapability(capSysResource)
	size, grown := int64(64<<20), int64(128<<20)
	if fsType == "xfs" {
		size, grown = minXFSVolumeSize, minXFSVolumeSize+128<<20
	}
	r := newRig(t)
	ctx, cancel := r.ctx()
	defer cancel()
	volM := r.createVolume("restart-mount", mountCapOf(fsType), size)
	volB := r.createVolume("restart-block", blockCapOf(), 16<<20)
	stageM, targetM := filepath.Join(r.pods, "stage-m"), filepath.Join(r.pods, "pod", "target-m")
	stageB, targetB := filepath.Join(r.pods, "stage-b"), filepath.Join(r.pods, "pod", "target-b")
	for _, d := range []string{stageM, stageB} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []struct {
		id, stage, target string
		c                 *csi.VolumeCapability
	}{{volM, stageM, targetM, mountCapOf(fsType)}, {volB, stageB, targetB, blockCapOf()}} {
		if _, err := r.c.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.stage, VolumeCapability: v.c}); err != nil {
			t.Fatalf("stage %s: %v", v.id, err)
		}
		if _, err := r.c.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.stage, TargetPath: v.target, VolumeCapability: v.c}); err != nil {
			t.Fatalf("publish %s: %v", v.id, err)
		}
	}
	// Data: a file in the file system, a pattern on the block device, both flushed.
	fileData := make([]byte, 1<<20)
	rand.Read(fileData)
	if err := writeSynced(filepath.Join(targetM, "data"), fileData, -1); err != nil {
		t.Fatal(err)
	}
	blockData := make([]byte, 64<<10)
	rand.Read(blockData)
	if err := writeSynced(targetB, blockData, 1<<20); err != nil {
		t.Fatal(err)
	}
	fsBefore := statfs(t, targetM)
	loopsBefore, err := blockdev.Loops(r.run)
	if err != nil || len(loopsBefore) != 2 {
		t.Fatalf("loop devices before the kill: %+v, %v", loopsBefore, err)
	}

	r.restartDriver()
	ctx, cancel = r.ctx()
	defer cancel()

	if loops, _ := blockdev.Loops(r.run); len(loops) != 2 {
		t.Fatalf("loop devices after the restart: %+v", loops)
	}
	// Stats of both.
	st, err := r.c.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volM, VolumePath: targetM})
	if err != nil {
		t.Fatalf("stats of the mount volume: %v", err)
	}
	var bytesU, inodesU *csi.VolumeUsage
	for _, u := range st.Usage {
		switch u.Unit {
		case csi.VolumeUsage_BYTES:
			bytesU = u
		case csi.VolumeUsage_INODES:
			inodesU = u
		}
	}
	if bytesU == nil || inodesU == nil || bytesU.Total <= 0 || bytesU.Used < int64(len(fileData)) || bytesU.Available <= 0 || inodesU.Total <= 0 || inodesU.Used <= 0 {
		t.Errorf("stats of the mount volume: %v", st.Usage)
	}
	st, err = r.c.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volB, VolumePath: targetB})
	if err != nil {
		t.Fatalf("stats of the block volume: %v", err)
	}
	if len(st.Usage) != 1 || st.Usage[0].Unit != csi.VolumeUsage_BYTES || st.Usage[0].Total != 16<<20 {
		t.Errorf("stats of the block volume: %v", st.Usage)
	}
	// Health of both: the server never died, so neither is stale.
	for _, id := range []string{volM, volB} {
		h, err := r.c.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
		if err != nil || len(h.VolumeHealth.HealthStatuses) > 0 {
			t.Errorf("health of %s: %v, %v", id, h, err)
		}
	}
	// Expansion: the file system grows online, the block device takes the size at once.
	ex, err := r.c.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: volM, CapacityRange: capacity(grown, 0), VolumeCapability: mountCapOf(fsType)})
	if err != nil || ex.CapacityBytes != grown || !ex.NodeExpansionRequired {
		t.Fatalf("expand the mount volume: %v, %v", ex, err)
	}
	if !growFS {
		_, err := r.c.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: volM, VolumePath: targetM, StagingTargetPath: stageM,
			CapacityRange: capacity(grown, 0), VolumeCapability: mountCapOf(fsType)})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
			t.Fatalf("node-expand a mounted ext4 without CAP_SYS_RESOURCE: %v, want FailedPrecondition naming the capability", err)
		}
		t.Logf("without CAP_SYS_RESOURCE the driver refuses to grow the mounted ext4, clearly: %v", err)
	} else {
		if _, err := r.c.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: volM, VolumePath: targetM, StagingTargetPath: stageM,
			CapacityRange: capacity(grown, 0), VolumeCapability: mountCapOf(fsType)}); err != nil {
			t.Fatalf("node-expand the mount volume: %v", err)
		}
		fsAfter := statfs(t, targetM)
		if before, after := int64(fsBefore.Blocks)*fsBefore.Bsize, int64(fsAfter.Blocks)*fsAfter.Bsize; after < before+(grown-size)*3/4 {
			t.Errorf("the file system did not grow: %d -> %d bytes", before, after)
		} else {
			t.Logf("%s grew online after the restart: %d -> %d MiB", fsType, before>>20, after>>20)
		}
	}
	ex, err = r.c.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: volB, CapacityRange: capacity(32<<20, 0), VolumeCapability: blockCapOf()})
	if err != nil || ex.CapacityBytes != 32<<20 || ex.NodeExpansionRequired {
		t.Fatalf("expand the block volume: %v, %v", ex, err)
	}
	if n, err := deviceSize(targetB); err != nil || n != 32<<20 {
		t.Errorf("the block device has %d bytes (%v), want %d", n, err, 32<<20)
	}
	// The data is still there.
	if b, err := os.ReadFile(filepath.Join(targetM, "data")); err != nil || !bytes.Equal(b, fileData) {
		t.Errorf("the file's data changed (%v)", err)
	}
	if b, err := readAt(targetB, len(blockData), 1<<20); err != nil || !bytes.Equal(b, blockData) {
		t.Errorf("the block device's data changed (%v)", err)
	}
	// And it all comes down.
	for _, v := range []struct{ id, stage, target string }{{volM, stageM, targetM}, {volB, stageB, targetB}} {
		if _, err := r.c.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
			t.Errorf("unpublish %s: %v", v.id, err)
		}
		if _, err := r.c.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.stage}); err != nil {
			t.Errorf("unstage %s: %v", v.id, err)
		}
		if _, err := r.c.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			t.Errorf("delete %s: %v", v.id, err)
		}
	}
	r.finish(t)
}

// finish checks that nothing is left, stops the driver and the server (both must exit 0 on
// SIGTERM) and checks that no process of ours remains and the store is sound.
func (r *rig) finish(t *testing.T) {
	t.Helper()
	if loops, _ := blockdev.Loops(r.run); len(loops) > 0 {
		t.Errorf("loop devices left: %+v", loops)
	}
	for _, dir := range []string{r.pods, r.root} {
		if ms := mountsUnder(t, dir); len(ms) > 0 {
			t.Errorf("mounts left: %v", ms)
		}
	}
	if err := r.driver.term(30 * time.Second); err != nil {
		t.Errorf("driver: SIGTERM: %v", err)
	}
	if err := r.server.term(30 * time.Second); err != nil {
		t.Errorf("server: SIGTERM: %v", err)
	}
	if ms := mountsUnder(t, r.run); len(ms) > 0 {
		t.Errorf("mounts left in the run directory: %v", ms)
	}
	if ps := binaryProcesses(r.bin); len(ps) > 0 {
		t.Errorf("processes left: %v", ps)
	}
	if ps := childProcesses(); len(ps) > 0 {
		t.Errorf("child processes left: %v", ps)
	}
	st, err := cow.OpenStore(filepath.Join(r.root, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		t.Errorf("store check: %v, %v", probs, err)
	}
}

// writeSynced writes p at off (-1: a new file) and flushes it.
func writeSynced(path string, p []byte, off int64) error {
	flag := os.O_WRONLY
	if off < 0 {
		flag |= os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		return err
	}
	if off < 0 {
		_, err = f.Write(p)
	} else {
		_, err = f.WriteAt(p, off)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func readAt(path string, n int, off int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	_, err = f.ReadAt(b, off)
	return b, err
}

// killRound sends one request, kills the driver (SIGKILL) 0–20 ms later, starts it again and
// retries the same request, which must succeed. It returns the store's problems as the
// kill left them (checked before the new driver starts, which tidies the store).
func (r *rig) killRound(t *testing.T, call func(ctx context.Context, c *csiConn) error) []cow.Problem {
	t.Helper()
	c := r.c
	errc := make(chan error, 1)
	go func() {
		ctx, cancel := r.ctx()
		defer cancel()
		errc <- call(ctx, c)
	}()
	time.Sleep(time.Duration(mrand.IntN(20_001)) * time.Microsecond)
	var err error
	select {
	case err = <-errc:
		r.driver.kill()
	default:
		r.driver.kill()
		err = <-errc
	}
	if err == nil {
		r.completedBeforeKill++
	} else {
		r.killedDuringRPC++
		if code := status.Code(err); code != codes.Unavailable && code != codes.Canceled {
			t.Logf("the killed request answered %v", err)
		}
	}
	r.c.conn.Close()
	st, err := cow.OpenStore(filepath.Join(r.root, "store"))
	if err != nil {
		t.Fatal(err)
	}
	probs, err := st.Check(false)
	if err != nil {
		t.Fatal(err)
	}
	r.restarts++
	r.startDriver()
	ctx, cancel := r.ctx()
	defer cancel()
	if err := call(ctx, r.c); err != nil {
		t.Fatalf("retry after the restart: %v", err)
	}
	return probs
}

// storeNames returns the store's volumes and snapshots and the stray files of its directory
// (temp files of an atomic write a kill cut short).
func (r *rig) storeNames(t *testing.T) (vols, snaps, strays []string) {
	t.Helper()
	st, err := cow.OpenStore(filepath.Join(r.root, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if vols, err = st.Volumes(); err != nil {
		t.Fatal(err)
	}
	if snaps, err = st.Snapshots(); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(filepath.Join(r.root, "store"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".manifest") {
			strays = append(strays, e.Name())
		}
	}
	return vols, snaps, strays
}

// TestDriverKilledDuringRPC kills the driver (SIGKILL) 0–20 ms into CreateVolume,
// CreateSnapshot (of a staged, published block volume: the server takes it live) and
// DeleteVolume, 20 times each, starts it again and retries the same request. The retry
// succeeds; afterwards the volume or snapshot exists exactly once (or not at all after a
// delete), nothing else appeared, and the store's Check finds no problem; problems a killed
// request left before its retry are reported.
func TestDriverKilledDuringRPC(t *testing.T) {
	const rounds = 20
	r := newRig(t)
	ctx, cancel := r.ctx()
	defer cancel()
	problems := map[string]int{}
	report := func(what string, probs []cow.Problem) {
		for _, p := range probs {
			msg := p.Message
			if strings.Contains(msg, "stray file") {
				msg = "stray file in layers/"
			} else if strings.Contains(msg, "no volume or snapshot uses it") {
				msg = "unused layer"
			}
			problems[what+": "+msg]++
		}
	}
	afterRetry := func(what string) {
		st, err := cow.OpenStore(filepath.Join(r.root, "store"))
		if err != nil {
			t.Fatal(err)
		}
		probs, err := st.Check(false)
		if err != nil {
			t.Fatal(err)
		}
		report(what+" (after the retry)", probs)
	}

	// CreateVolume.
	want := map[string]bool{}
	for i := 0; i < rounds; i++ {
		name := fmt.Sprintf("kill-create-%d", i)
		var id string
		report("CreateVolume (as the kill left it)", r.killRound(t, func(ctx context.Context, c *csiConn) error {
			resp, err := c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()}, CapacityRange: capacity(4<<20, 0)})
			if err == nil {
				id = resp.Volume.VolumeId
			}
			return err
		}))
		if id != volumeIDFor(name) {
			t.Fatalf("%s got ID %q", name, id)
		}
		want[id] = true
		afterRetry("CreateVolume")
		vols, _, _ := r.storeNames(t)
		checkSet(t, "volumes", vols, want)
		resp, err := r.c.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, e := range resp.Entries {
			if e.Volume.VolumeId == id {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("ListVolumes lists %s %d times", id, n)
		}
	}

	// CreateSnapshot of a staged and published block volume: the server snapshots it live.
	src := r.createVolume("kill-snap-source", blockCapOf(), 8<<20)
	want[src] = true
	stage, target := filepath.Join(r.pods, "stage"), filepath.Join(r.pods, "target")
	if err := os.MkdirAll(stage, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: src, StagingTargetPath: stage, VolumeCapability: blockCapOf()}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: src, StagingTargetPath: stage, TargetPath: target, VolumeCapability: blockCapOf()}); err != nil {
		t.Fatal(err)
	}
	wantSnaps := map[string]bool{}
	for i := 0; i < rounds; i++ {
		name := fmt.Sprintf("kill-snap-%d", i)
		// A write before each snapshot, so that every one freezes data.
		if err := writeSynced(target, bytes.Repeat([]byte{byte(i)}, 4096), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		var id string
		report("CreateSnapshot (as the kill left it)", r.killRound(t, func(ctx context.Context, c *csiConn) error {
			resp, err := c.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: src})
			if err == nil {
				id = resp.Snapshot.SnapshotId
				if resp.Snapshot.SourceVolumeId != src || !resp.Snapshot.ReadyToUse {
					return fmt.Errorf("snapshot %v", resp.Snapshot)
				}
			}
			return err
		}))
		if id != snapshotIDFor(name) {
			t.Fatalf("%s got ID %q", name, id)
		}
		wantSnaps[id] = true
		afterRetry("CreateSnapshot")
		vols, snaps, _ := r.storeNames(t)
		checkSet(t, "volumes", vols, want)
		checkSet(t, "snapshots", snaps, wantSnaps)
		resp, err := r.c.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: src})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Entries) != len(wantSnaps) {
			t.Fatalf("ListSnapshots lists %d snapshots of %s, want %d", len(resp.Entries), src, len(wantSnaps))
		}
	}
	// The live volume kept working through it all.
	if b, err := readAt(target, 4096, (rounds-1)*4096); err != nil || !bytes.Equal(b, bytes.Repeat([]byte{rounds - 1}, 4096)) {
		t.Errorf("the published volume lost a write (%v)", err)
	}

	// DeleteVolume of the volumes the first part made.
	for i := 0; i < rounds; i++ {
		id := volumeIDFor(fmt.Sprintf("kill-create-%d", i))
		report("DeleteVolume (as the kill left it)", r.killRound(t, func(ctx context.Context, c *csiConn) error {
			_, err := c.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		}))
		delete(want, id)
		afterRetry("DeleteVolume")
		vols, _, _ := r.storeNames(t)
		checkSet(t, "volumes", vols, want)
		if _, err := r.c.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id}); status.Code(err) != codes.NotFound {
			t.Fatalf("%s after its deletion: %v", id, err)
		}
	}
	_, _, strays := r.storeNames(t)

	// Clean up through the driver, then one more transaction, which removes strays.
	for id := range wantSnaps {
		if _, err := r.c.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Errorf("delete snapshot %s: %v", id, err)
		}
	}
	if _, err := r.c.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: src, TargetPath: target}); err != nil {
		t.Error(err)
	}
	if _, err := r.c.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: src, StagingTargetPath: stage}); err != nil {
		t.Error(err)
	}
	if _, err := r.c.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src}); err != nil {
		t.Error(err)
	}
	t.Logf("%d restarts; %d requests were cut by the kill, %d had completed before it", r.restarts, r.killedDuringRPC, r.completedBeforeKill)
	for _, k := range keysSorted(problems) {
		t.Logf("store check: %s: %d times", k, problems[k])
	}
	t.Logf("temp files of the manifest left in the store directory: %v", strays)
	for k := range problems {
		if strings.Contains(k, "after the retry") {
			t.Errorf("the store had problems after a retry: %s (%d times)", k, problems[k])
		}
	}
	r.finish(t)
}

func checkSet(t *testing.T, what string, got []string, want map[string]bool) {
	t.Helper()
	seen := map[string]int{}
	for _, g := range got {
		seen[g]++
	}
	for g, n := range seen {
		if n != 1 || !want[g] {
			t.Fatalf("%s: %s appears %d times (wanted: %v)", what, g, n, want[g])
		}
	}
	for w := range want {
		if seen[w] != 1 {
			t.Fatalf("%s: %s is missing", what, w)
		}
	}
}

// TestGroupSnapshotExternalServer takes a group snapshot of two staged block volumes in the
// shipped layout (the driver beside `csi-rawcow serve`, which holds every staged volume): the
// driver must go through the server, and the members hold exactly the writes before it.
func TestGroupSnapshotExternalServer(t *testing.T) {
	r := newRig(t)
	ctx, cancel := r.ctx()
	defer cancel()
	before, after := bytes.Repeat([]byte("before! "), 8192), bytes.Repeat([]byte("after!! "), 8192)
	var vols, targets []string
	for _, name := range []string{"group-a", "group-b"} {
		id := r.createVolume(name, blockCapOf(), 16<<20)
		target := r.stageBlock(ctx, id)
		if err := writeSynced(target, before, 1<<20); err != nil {
			t.Fatal(err)
		}
		vols, targets = append(vols, id), append(targets, target)
	}
	g, err := r.c.group.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "both", SourceVolumeIds: vols})
	if err != nil {
		t.Fatalf("group snapshot of staged volumes: %v", err)
	}
	for _, target := range targets {
		if err := writeSynced(target, after, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	for _, s := range g.GroupSnapshot.Snapshots {
		ids = append(ids, s.SnapshotId)
		resp, err := r.c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-" + s.SnapshotId,
			VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()}, CapacityRange: capacity(16<<20, 0),
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}}})
		if err != nil {
			t.Fatalf("restore %s: %v", s.SnapshotId, err)
		}
		target := r.stageBlock(ctx, resp.Volume.VolumeId)
		if got, err := readAt(target, len(before), 1<<20); err != nil || !bytes.Equal(got, before) {
			t.Errorf("the member of %s does not hold the writes before the group snapshot (%v)", s.SourceVolumeId, err)
		}
		r.unstageAndDelete(ctx, resp.Volume.VolumeId)
	}
	if _, err := r.c.group.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{
		GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId, SnapshotIds: ids}); err != nil {
		t.Fatal(err)
	}
	for _, id := range vols {
		r.unstageAndDelete(ctx, id)
	}
	r.finish(t)
}

// stageBlock stages and publishes a block volume under r.pods and returns the published path.
func (r *rig) stageBlock(ctx context.Context, id string) string {
	r.t.Helper()
	stage, target := filepath.Join(r.pods, "stage-"+id), filepath.Join(r.pods, "target-"+id)
	if err := os.MkdirAll(stage, 0o750); err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.c.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: stage, VolumeCapability: blockCapOf()}); err != nil {
		r.t.Fatalf("stage %s: %v", id, err)
	}
	if _, err := r.c.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: stage, TargetPath: target, VolumeCapability: blockCapOf()}); err != nil {
		r.t.Fatalf("publish %s: %v", id, err)
	}
	return target
}

// unstageAndDelete undoes stageBlock and deletes the volume.
func (r *rig) unstageAndDelete(ctx context.Context, id string) {
	r.t.Helper()
	if _, err := r.c.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: filepath.Join(r.pods, "target-"+id)}); err != nil {
		r.t.Errorf("unpublish %s: %v", id, err)
	}
	if _, err := r.c.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(r.pods, "stage-"+id)}); err != nil {
		r.t.Errorf("unstage %s: %v", id, err)
	}
	if _, err := r.c.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		r.t.Errorf("delete %s: %v", id, err)
	}
}
