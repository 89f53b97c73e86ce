package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// openPTY opens a pseudo-terminal pair; both ends are closed when the test ends.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	need(t, err == nil, fmt.Sprintf("no pseudo-terminals: %v", err))
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetUint32(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("ptsname: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open pty slave: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

// drain reads the master side of a pty until every slave is closed (EIO).
func drain(master *os.File) <-chan string {
	ch := make(chan string, 1)
	go func() {
		var b bytes.Buffer
		io.Copy(&b, master)
		ch <- b.String()
	}()
	return ch
}

func receive(t *testing.T, ch <-chan string) string {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("the pty never closed")
		return ""
	}
}

func TestProgressQuietWhenNotTerminal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for _, out := range []*os.File{f, w, nil} {
		p := newProgress(out, "quiet")
		if p != nil {
			t.Fatalf("newProgress(%v) made a bar on a non-terminal", out)
		}
		p.Update(1, 2) // a nil bar is silent
		p.Update(2, 2)
		p.Finish()
		p.Abort()
	}
	if fi, _ := f.Stat(); fi.Size() != 0 {
		t.Fatalf("a progress bar wrote %d bytes to a file", fi.Size())
	}
	w.Close()
	if got, _ := io.ReadAll(r); len(got) != 0 {
		t.Fatalf("a progress bar wrote %q to a pipe", got)
	}
}

func TestProgressOnTerminal(t *testing.T) {
	master, slave := openPTY(t)
	out := drain(master)
	p := newProgress(slave, "copying")
	if p == nil {
		t.Fatal("no bar on a terminal")
	}
	p.Update(0, 0) // nothing known yet: nothing drawn
	p.Update(3<<20, 8<<20)
	p.Update(8<<20, 8<<20)
	p.Finish()
	slave.Close()
	got := receive(t, out)
	if !strings.Contains(got, "copying") || !strings.Contains(got, "100%") || !strings.Contains(got, "8.0 MiB") {
		t.Fatalf("the bar drew %q", got)
	}
}

// TestFlattenProgress runs flatten with stderr on a terminal: the bar shows there, and
// stdout keeps only the result line. (Not a terminal: the end-to-end tests require an
// empty stderr from flatten.)
func TestFlattenProgress(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	mustRun(t, store, "create", "vol", "4M")
	writeVolume(t, store, "vol", func(c *cow.Chain) {
		if _, err := c.WriteAt(pattern(1<<20, 10), 1<<20); err != nil {
			t.Fatal(err)
		}
	})
	master, slave := openPTY(t)
	out := drain(master)
	dst := filepath.Join(t.TempDir(), "vol.raw")
	cmd := exec.Command(binPath, "image", "--store", store, "flatten", "vol", dst)
	cmd.Env = testEnv
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, slave
	if err := cmd.Run(); err != nil {
		t.Fatalf("flatten: %v", err)
	}
	slave.Close()
	tty := receive(t, out)
	if !strings.Contains(tty, "flatten vol") || !strings.Contains(tty, "100%") {
		t.Fatalf("no progress bar on the terminal: %q", tty)
	}
	if s := stdout.String(); !strings.HasPrefix(s, "flattened vol to ") || strings.Count(s, "\n") != 1 || strings.Contains(s, "%") {
		t.Fatalf("stdout: %q", s)
	}
}
