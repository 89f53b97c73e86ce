package blockdev_test

import (
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

func serveForTest(spec string) int {
	storeDir, runDir, _ := cutLast(spec, ":")
	st, err := cow.OpenStore(storeDir)
	if err != nil {
		return 1
	}
	srv, err := blockdev.NewServer(st, runDir, blockdev.Options{})
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
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
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
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

// TestServerKilled: SIGKILL of the server under load. The loop device fails I/O instead of
// hanging; after a restart the volume attaches again and holds every flushed write.
func TestServerKilled(t *testing.T) {
	requireTools(t)
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
