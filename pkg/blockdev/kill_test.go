package blockdev_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestMain doubles as a server process for TestServerKilled: with BLOCKDEV_TEST_SERVE set to
// "STORE:RUNDIR" the test binary serves until it is killed.
func TestMain(m *testing.M) {
	if spec := os.Getenv("BLOCKDEV_TEST_SERVE"); spec != "" {
		os.Exit(serveForTest(spec))
	}
	os.Exit(m.Run())
}

// testTransportEnv names the FUSE transport of the server process (empty: the default).
const testTransportEnv = "BLOCKDEV_TEST_TRANSPORT"

func serveForTest(spec string) int {
	storeDir, runDir, _ := cutLast(spec, ":")
	st, err := cow.OpenStore(storeDir)
	if err != nil {
		return 1
	}
	srv, err := blockdev.NewServer(st, runDir, blockdev.Options{Transport: os.Getenv(testTransportEnv)})
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		return 1
	}
	if want := os.Getenv(testTransportEnv); want != "" && srv.Transport() != want {
		os.Stderr.WriteString("serving over " + srv.Transport() + ", not " + want + "\n")
		return 1
	}
	if _, err := srv.ServeControl(); err != nil {
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	if err := srv.Close(); err != nil {
		return 1
	}
	return 0
}

func cutLast(s, sep string) (string, string, bool) {
	for i := len(s) - len(sep); i >= 0; i-- {
		if s[i:i+len(sep)] == sep {
			return s[:i], s[i+len(sep):], true
		}
	}
	return s, "", false
}

// serverProcess runs the server in a child process; stop ends it (SIGTERM, then SIGKILL).
type serverProcess struct {
	cmd *exec.Cmd
}

func startServerProcess(t *testing.T, storeDir, runDir string) *serverProcess {
	return startServerAttr(t, storeDir, runDir, nil)
}

// startServerAttr starts the server process with attr (nil: none).
func startServerAttr(t *testing.T, storeDir, runDir string, attr *syscall.SysProcAttr) *serverProcess {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.SysProcAttr = attr
	cmd.Env = append(os.Environ(), "BLOCKDEV_TEST_SERVE="+storeDir+":"+runDir)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &serverProcess{cmd: cmd}
	t.Cleanup(p.stop)
	sock := filepath.Join(runDir, blockdev.ControlSocket)
	for i := 0; i < 500; i++ {
		if c, err := blockdev.Dial(runDir); err == nil {
			c.Close()
			return p
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("server did not open %s", sock)
	return nil
}

func (p *serverProcess) stop() {
	if p.cmd.ProcessState != nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

func (p *serverProcess) kill() {
	p.cmd.Process.Kill()
	p.cmd.Wait()
}

const killBlocks = 256

// blockPattern fills a block with its number and the round that wrote it.
func blockPattern(buf []byte, block, round uint64) {
	for i := 0; i < len(buf); i += 16 {
		binary.LittleEndian.PutUint64(buf[i:], block)
		binary.LittleEndian.PutUint64(buf[i+8:], round)
	}
}

// alignedBuffer returns a block-aligned buffer for O_DIRECT.
func alignedBuffer(n int) []byte {
	raw := make([]byte, n+cow.BlockSize)
	off := cow.BlockSize - int(uintptr(unsafe.Pointer(&raw[0]))%cow.BlockSize)
	return raw[off%cow.BlockSize:][:n]
}

// TestServerKilled: SIGKILL of the server under load, over each FUSE transport. The loop
// device fails I/O instead of hanging; after a restart the volume attaches again and holds
// every flushed write.
func TestServerKilled(t *testing.T) {
	requireTools(t)
	for _, transport := range testsrv.Transports {
		t.Run(transport, func(t *testing.T) {
			if transport == blockdev.TransportIOUring {
				testsrv.RequireIOUring(t)
			}
			t.Setenv(testTransportEnv, transport)
			testServerKilled(t)
		})
	}
}

func testServerKilled(t *testing.T) {
	storeDir, runDir := t.TempDir(), t.TempDir()
	st, err := cow.OpenStore(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", cow.CreateOptions{Base: makeBase(t, t.TempDir(), 8<<20), Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { assertReleased(t, runDir) })
	srv := startServerProcess(t, storeDir, runDir)
	c, err := blockdev.Dial(runDir)
	if err != nil {
		t.Fatal(err)
	}
	a, err := c.Attach("vol", blockdev.AttachOptions{})
	c.Close()
	if err != nil {
		t.Fatal(err)
	}

	// The writer rewrites every block each round and flushes the device after each round.
	type result struct {
		flushed, started uint64
		err              error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		f, err := os.OpenFile(a.Device, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			r.err = err
			done <- r
			return
		}
		defer f.Close()
		buf := alignedBuffer(cow.BlockSize)
		for round := uint64(1); ; round++ {
			r.started = round
			for b := uint64(0); b < killBlocks; b++ {
				blockPattern(buf, b, round)
				// Spread the blocks so that some land on base data, some on holes.
				if _, r.err = f.WriteAt(buf, int64(b*97%(64<<20/cow.BlockSize))*cow.BlockSize); r.err != nil {
					done <- r
					return
				}
			}
			if r.err = f.Sync(); r.err != nil {
				done <- r
				return
			}
			r.flushed = round
		}
	}()
	time.Sleep(700 * time.Millisecond)
	srv.kill()
	var res result
	select {
	case res = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("I/O on the loop device hangs after the server was killed")
	}
	if res.err == nil || res.flushed == 0 {
		t.Fatalf("writer: flushed %d rounds, error %v; want some flushed rounds, then an I/O error", res.flushed, res.err)
	}
	t.Logf("server killed after %d flushed rounds; the writer then got: %v", res.flushed, res.err)

	startServerProcess(t, storeDir, runDir)
	c, err = blockdev.Dial(runDir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	as, err := c.List()
	if err != nil || len(as) != 1 || !as[0].Stale || as[0].Device != a.Device {
		t.Fatalf("after restart the server should report %s as stale: %+v, %v", a.Device, as, err)
	}
	b, err := c.Attach("vol", blockdev.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(b.Device, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuffer(cow.BlockSize)
	for blk := uint64(0); blk < killBlocks; blk++ {
		if _, err := f.ReadAt(buf, int64(blk*97%(64<<20/cow.BlockSize))*cow.BlockSize); err != nil {
			t.Fatal(err)
		}
		gotBlock, round := binary.LittleEndian.Uint64(buf), binary.LittleEndian.Uint64(buf[8:])
		if gotBlock != blk || round < res.flushed || round > res.started {
			t.Errorf("block %d holds (block %d, round %d); flushed round %d, last started %d", blk, gotBlock, round, res.flushed, res.started)
		}
	}
	f.Close()
	if err := c.Detach("vol"); err != nil {
		t.Fatal(err)
	}
	probs, err := st.Check(false)
	if err != nil || len(probs) > 0 {
		t.Fatalf("check after the kill: %v %v", err, probs)
	}
	if _, err := os.Stat(a.Device); err == nil {
		if loops, _ := blockdev.Loops(runDir); len(loops) > 0 {
			t.Errorf("stale device not released: %+v", loops)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		t.Error(err)
	}
}

// TestServerRestartedInNewNamespace: a server in its own mount namespace (a container) is
// killed with a merged and a composed volume attached; its namespace goes with it, and the
// kernel now reports the devices' backing files relative to mounts that no longer exist.
// The next server, in another namespace, still finds both by their tags: the merged one as
// stale, the composed one taken back, working and holding its data; both then detach.
func TestServerRestartedInNewNamespace(t *testing.T) {
	requireTools(t)
	dir := testfs.Mount(t, "xfs", 1<<30)
	storeDir, runDir := filepath.Join(dir, "store"), t.TempDir()
	st, err := cow.OpenStore(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"merged", "composed"} {
		if err := st.Create(name, cow.CreateOptions{Size: 16 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { assertReleased(t, runDir) })
	srv := startServerAttr(t, storeDir, runDir, &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS})
	c, err := blockdev.Dial(runDir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Attach("merged", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
	if err != nil {
		t.Fatal(err)
	}
	comp, err := c.Attach("composed", blockdev.AttachOptions{Presentation: blockdev.PresentComposed})
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("composed"), 4096)
	testsrv.WriteDevice(t, comp.Device, data, 0)
	srv.kill()

	if byPath, _ := blockdev.Loops(runDir); len(byPath) > 0 {
		t.Fatalf("the backing files' paths still lie under the run directory: %+v; the test shows nothing", byPath)
	}
	startServerProcess(t, storeDir, runDir)
	c, err = blockdev.Dial(runDir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	as, err := c.List()
	if err != nil || len(as) != 2 {
		t.Fatalf("after the restart the server lists %+v (%v), want both devices", as, err)
	}
	for _, a := range as {
		switch {
		case a.Name == "merged" && (!a.Stale || a.Device != m.Device):
			t.Errorf("the merged volume's device %s should be stale: %+v", m.Device, a)
		case a.Name == "composed" && (a.Stale || !a.Composed || a.Device != comp.Device):
			t.Errorf("the composed volume's device %s should be taken back: %+v", comp.Device, a)
		}
	}
	if got := testsrv.ReadDevice(t, comp.Device, 0, int64(len(data))); !bytes.Equal(got, data) {
		t.Error("the composed volume's device lost its data across the restart")
	}
	for _, name := range []string{"merged", "composed"} {
		if err := c.Detach(name); err != nil {
			t.Fatalf("detach %s: %v", name, err)
		}
	}
	if left, err := blockdev.LoopsOf(runDir); err != nil || len(left) > 0 {
		t.Fatalf("devices left after detaching both: %+v (%v)", left, err)
	}
}

// TestDetachAfterDeviceReused: a detach that finds the device busy leaves it to the kernel,
// which frees it at the last close and may give its number to the next attachment. Neither
// a repeated detach nor a new attach of the first name may then touch the second's device.
func TestDetachAfterDeviceReused(t *testing.T) {
	requireTools(t)
	st, err := cow.OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		if err := st.Create(name, cow.CreateOptions{Size: 16 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	srv := testsrv.Start(t, st, t.TempDir())
	a, err := srv.Attach("a", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
	if err != nil {
		t.Fatal(err)
	}
	holder, err := os.Open(a.Device)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Detach("a"); !errors.Is(err, cow.ErrBusy) {
		holder.Close()
		t.Fatalf("detach of an open device: %v, want ErrBusy", err)
	}
	holder.Close() // the kernel detaches it now
	sysBacking := filepath.Join("/sys/block", filepath.Base(a.Device), "loop", "backing_file")
	for i := 0; ; i++ {
		if _, err := os.Stat(sysBacking); errors.Is(err, os.ErrNotExist) {
			break
		}
		if i == 500 {
			t.Fatalf("%s still attached after its last close", a.Device)
		}
		time.Sleep(10 * time.Millisecond)
	}
	b, err := srv.Attach("b", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
	if err != nil {
		t.Fatal(err)
	}
	if b.Device != a.Device {
		t.Logf("the kernel gave b %s, not a's %s; the checks below still hold", b.Device, a.Device)
	}
	if err := srv.Detach("a"); err != nil {
		t.Fatalf("repeated detach of a: %v", err)
	}
	a2, err := srv.Attach("a", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
	if err != nil {
		t.Fatal(err)
	}
	if a2.Device == b.Device {
		t.Fatalf("a was attached again as %s, which serves b", b.Device)
	}
	testsrv.WriteDevice(t, b.Device, bytes.Repeat([]byte("b"), 4096), 0)
	if got := testsrv.ReadDevice(t, b.Device, 0, 4096); !bytes.Equal(got, bytes.Repeat([]byte("b"), 4096)) {
		t.Fatal("b's device does not serve b any more")
	}
	for _, name := range []string{"a", "b"} {
		if err := srv.Detach(name); err != nil {
			t.Fatal(err)
		}
	}
}
