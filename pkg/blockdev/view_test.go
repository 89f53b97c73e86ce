package blockdev_test

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// readDirect reads n bytes at off of dev with O_DIRECT (block-aligned memory), giving up
// after a minute so that a hung device fails the test instead of blocking it.
func readDirect(t *testing.T, dev string, off int64, n int) ([]byte, error) {
	t.Helper()
	type result struct {
		data []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer f.Close()
		buf := alignedBuffer(n)
		_, err = f.ReadAt(buf, off)
		done <- result{buf, err}
	}()
	select {
	case r := <-done:
		return r.data, r.err
	case <-time.After(time.Minute):
		t.Fatalf("read of %s at %d hung", dev, off)
		return nil, nil
	}
}

// Reads of base and frozen data reply from the layers' mappings without a copy in the server.
// A base truncated behind the store's back then faults in the kernel's copy: the read fails
// with EIO instead of hanging or killing the server, the rest of the volume reads on, and the
// volume detaches cleanly.
func TestReadFromTruncatedBase(t *testing.T) {
	requireTools(t)
	dir := t.TempDir()
	base := makeBase(t, dir, 8<<20)
	want, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	st := storeWithVolume(t, cow.CreateOptions{Base: base})
	srv := startServer(t, st)
	a, err := srv.Attach("vol", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
	if err != nil {
		t.Fatal(err)
	}
	own := bytes.Repeat([]byte("top!"), 1024)
	f, err := os.OpenFile(a.Device, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(own, 6<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Snapshot("vol", "snap", nil); err != nil { // the write is in a frozen layer now
		t.Fatal(err)
	}
	got, err := readDirect(t, a.Device, 0, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	copy(want[6<<20:], own)
	if !bytes.Equal(got, want) {
		t.Fatal("the attached volume does not read as its base and its snapshot's write")
	}

	if err := os.Truncate(base, 0); err != nil {
		t.Fatal(err)
	}
	_, err = readDirect(t, a.Device, 2<<20, 64<<10) // base data (makeBase: every other MiB)
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("read of data of a truncated base: %v, want EIO", err)
	}
	t.Logf("read of data of a truncated base: %v", err)
	if got, err := readDirect(t, a.Device, 6<<20, len(own)); err != nil || !bytes.Equal(got, own) {
		t.Fatalf("read of the snapshot's data after the fault: %v", err)
	}
	if err := srv.Detach("vol"); err != nil {
		t.Fatal(err)
	}
}
