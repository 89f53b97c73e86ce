package cow_test

// Presence on real file systems: the engine learns which blocks a layer holds from the
// host file system (FIEMAP, or SEEK_DATA/SEEK_HOLE), so the model test runs on each of
// them, including xfs with an inherited extent size hint, which would otherwise turn a
// 4 KiB write into a 1 MiB allocation with unwritten neighbours.

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// presenceOps is how many model operations run on each file system.
func presenceOps() int {
	if testing.Short() {
		return 3000
	}
	return 20000
}

func presenceSeed(t *testing.T) uint64 {
	seed := uint64(11)
	if s := os.Getenv("COW_MODEL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("base seed %d (COW_MODEL_SEED reruns it)", seed)
	return seed
}

// TestPresenceModel runs the model test in a store on ext4, xfs, btrfs and tmpfs.
func TestPresenceModel(t *testing.T) {
	for i, kind := range testfs.Kinds() {
		t.Run(kind, func(t *testing.T) {
			dir := testfs.Mount(t, kind, 256<<20)
			seed := presenceSeed(t) + uint64(i) // a different sequence on each file system
			m := newModelRun(t, dir, randSource{rand.New(rand.NewPCG(seed, seed))})
			defer m.close()
			m.run(presenceOps())
			t.Logf("operations: %v", m.ops)
		})
	}
}

// xfsExtsize returns the extent size hint xfs_io reports for path, in bytes.
func xfsExtsize(t *testing.T, path string) int64 {
	t.Helper()
	out, err := exec.Command("xfs_io", "-c", "extsize", path).CombinedOutput()
	if err != nil {
		t.Fatalf("xfs_io -c extsize %s: %v\n%s", path, err, out)
	}
	// "[1048576] /path"
	s := strings.TrimSpace(string(out))
	if !strings.HasPrefix(s, "[") || !strings.Contains(s, "]") {
		t.Fatalf("xfs_io -c extsize %s: unexpected output %q", path, s)
	}
	n, err := strconv.ParseInt(s[1:strings.Index(s, "]")], 10, 64)
	if err != nil {
		t.Fatalf("xfs_io -c extsize %s: unexpected output %q", path, s)
	}
	return n
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestPresenceXFSExtentHint runs the model in a store whose directory carries an
// inheritable 1 MiB extent size hint: layer files must come out without it (a 4 KiB write
// allocates 4 KiB), and the model must pass.
func TestPresenceXFSExtentHint(t *testing.T) {
	mnt := testfs.Mount(t, "xfs", 0)
	dir := filepath.Join(mnt, "hinted")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	testfs.SetExtentSizeHint(t, dir, 1<<20)

	// The control: a plain file made there inherits the hint, and 4 KiB written in its
	// middle allocate 1 MiB. Without this, the checks below could not fail.
	probe := filepath.Join(dir, "probe")
	f, err := os.Create(probe)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(16 << 20)
	_, err = f.WriteAt(make([]byte, 4096), 5<<20+8192)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if got := xfsExtsize(t, probe); got != 1<<20 {
		t.Fatalf("a file made in the hinted directory has extsize %d, want %d: the hint is not inherited", got, 1<<20)
	}
	if got := allocated(t, probe); got < 1<<20 {
		t.Fatalf("4 KiB written into a hinted file allocated %d bytes; the control expects 1 MiB", got)
	}
	os.Remove(probe)

	// A volume's 4 KiB write allocates 4 KiB.
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("probe", cow.CreateOptions{Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	c, err := st.Open("probe", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xab}, bs)
	if _, err := c.WriteAt(p, 5<<20+8192); err != nil {
		c.Close()
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	info, err := st.Info("probe")
	if err != nil {
		t.Fatal(err)
	}
	top := info.Layers[len(info.Layers)-1].Path
	if got := xfsExtsize(t, top); got != 0 {
		t.Errorf("layer %s has extsize %d, want 0", top, got)
	}
	if got := allocated(t, top); got != bs {
		t.Errorf("a 4 KiB write allocated %d bytes in the layer, want %d", got, bs)
	}
	if err := st.DeleteVolume("probe"); err != nil {
		t.Fatal(err)
	}

	// The model, in the same hinted directory (newModelRun makes dir/store and its base).
	seed := presenceSeed(t)
	m := newModelRun(t, dir, randSource{rand.New(rand.NewPCG(seed, seed))})
	defer m.close()
	m.run(presenceOps())
	t.Logf("operations: %v", m.ops)
	layers, err := filepath.Glob(filepath.Join(dir, "store", "layers", "*.raw"))
	if err != nil || len(layers) == 0 {
		t.Fatalf("no layers after the model run: %v", err)
	}
	for _, l := range layers {
		if got := xfsExtsize(t, l); got != 0 {
			t.Errorf("layer %s has extsize %d, want 0", l, got)
		}
	}
}

// TestPresenceXFSHintOnTop sets an extent size hint on a volume's top layer behind the
// engine's back: opening it read-write clears the hint when it can (the top has no
// extents yet), and refuses with ErrExtentHint when xfs cannot (the top has data).
// Read-only opens are not affected, and unwritten neighbours read as absent.
func TestPresenceXFSHintOnTop(t *testing.T) {
	dir := testfs.Mount(t, "xfs", 0)
	base := ccBase()
	basePath := filepath.Join(dir, "base.raw")
	writeSparse(t, basePath, base)
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	topOf := func(name string) string {
		info, err := st.Info(name)
		if err != nil {
			t.Fatal(err)
		}
		return info.Layers[len(info.Layers)-1].Path
	}
	setHint := func(path string) {
		if out, err := exec.Command("xfs_io", "-c", "extsize 1m", path).CombinedOutput(); err != nil {
			t.Fatalf("xfs_io extsize 1m %s: %v\n%s", path, err, out)
		}
		if got := xfsExtsize(t, path); got != 1<<20 {
			t.Fatalf("hint not set on %s: %d", path, got)
		}
	}

	// An empty top with a hint: cleared at open; a 4 KiB write allocates 4 KiB.
	if err := st.Create("empty", cow.CreateOptions{Base: basePath}); err != nil {
		t.Fatal(err)
	}
	top := topOf("empty")
	setHint(top)
	c, err := st.Open("empty", cow.OpenOptions{})
	if err != nil {
		t.Fatalf("open a top with a clearable hint: %v", err)
	}
	if got := xfsExtsize(t, top); got != 0 {
		t.Errorf("hint left on the top after a read-write open: %d", got)
	}
	p := bytes.Repeat([]byte{0xcd}, bs)
	if _, err := c.WriteAt(p, 100*bs); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, top); got != bs {
		t.Errorf("4 KiB write allocated %d bytes", got)
	}

	// A top that got a hint and then data (1 MiB allocated, mostly unwritten): xfs will not
	// clear the hint of a file with extents, so a read-write open is refused; read-only,
	// the unwritten neighbours read as the base.
	if err := st.Create("full", cow.CreateOptions{Base: basePath}); err != nil {
		t.Fatal(err)
	}
	top = topOf("full")
	setHint(top)
	f, err := os.OpenFile(top, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(p, 100*bs)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, top); got < 1<<20 {
		t.Fatalf("the control failed: 4 KiB written into a hinted top allocated only %d bytes", got)
	}
	before := storeStateOf(t, st.Dir(), false)
	if c, err := st.Open("full", cow.OpenOptions{}); !errors.Is(err, cow.ErrExtentHint) {
		if err == nil {
			c.Close()
		}
		t.Fatalf("read-write open of a top with an uncleared hint: got %v, want ErrExtentHint", err)
	}
	assertSameState(t, st.Dir(), before)
	want := bytes.Clone(base)
	copy(want[100*bs:], p)
	if got := readAll(t, st, "full"); !bytes.Equal(got, want) {
		t.Fatalf("read-only view of the hinted top differs at %d", firstDiff(got, want))
	}
}

// TestPresenceResize grows volumes on each file system: write at the last block, grow
// (open and closed, to sizes not a multiple of the block size), write across the old end,
// close, reopen, read back; snapshots keep their size and content.
func TestPresenceResize(t *testing.T) {
	for _, kind := range testfs.Kinds() {
		t.Run(kind, func(t *testing.T) {
			dir := testfs.Mount(t, kind, 64<<20)
			// A base that ends in the middle of a block.
			base := ccBase()[:10*bs+100]
			st := storeWithVolume(t, dir, base)
			want := make([]byte, 11*bs) // the size rounds up to the block size
			copy(want, base)
			c, err := st.Open("vol", cow.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { c.Close() }()
			write := func(off int64, n int, b byte) {
				t.Helper()
				p := bytes.Repeat([]byte{b}, n)
				if _, err := c.WriteAt(p, off); err != nil {
					t.Fatalf("write [%d,+%d): %v", off, n, err)
				}
				copy(want[off:], p)
			}
			verify := func(what string) {
				t.Helper()
				if c.Size() != int64(len(want)) {
					t.Fatalf("%s: size %d, want %d", what, c.Size(), len(want))
				}
				got := make([]byte, len(want)+bs)
				n, err := c.ReadAt(got, 0)
				if n != len(want) || err != io.EOF {
					t.Fatalf("%s: read past the end returned %d, %v; want %d, EOF", what, n, err, len(want))
				}
				if !bytes.Equal(got[:n], want) {
					t.Fatalf("%s: differs at %d", what, firstDiff(got[:n], want))
				}
			}
			verify("created")
			// The last block, partly: it holds the base's tail and zeros after it.
			write(10*bs+50, 30, 0x11)
			write(int64(len(want)-10), 10, 0x12)
			if _, err := c.WriteAt([]byte{1}, int64(len(want))); !errors.Is(err, cow.ErrOutOfRange) {
				t.Fatalf("write past the end: got %v, want ErrOutOfRange", err)
			}
			verify("after writing the last block")
			if err := c.Snapshot("small", nil); err != nil {
				t.Fatal(err)
			}
			small := bytes.Clone(want)

			// Grow the open chain to 20 blocks + 1 byte: 21 blocks.
			if err := c.Resize(20*bs + 1); err != nil {
				t.Fatal(err)
			}
			want = append(want, make([]byte, 10*bs)...)
			verify("grown open")
			write(int64(11*bs-100), 300, 0x13) // across the old end
			write(int64(len(want)-bs), bs, 0x14)
			if err := c.Resize(int64(len(want) - bs)); !errors.Is(err, cow.ErrShrink) {
				t.Fatalf("shrink: got %v, want ErrShrink", err)
			}
			verify("written after the grow")
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}

			// Grow it closed, then reopen and write beyond the previous end.
			if err := st.Resize("vol", int64(len(want))+3*bs-7); err != nil {
				t.Fatal(err)
			}
			want = append(want, make([]byte, 3*bs)...)
			if c, err = st.Open("vol", cow.OpenOptions{}); err != nil {
				t.Fatal(err)
			}
			verify("grown closed and reopened")
			write(int64(len(want)-3*bs-1), 2, 0x15)
			write(int64(len(want)-1), 1, 0x16)
			verify("written after the second grow")
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if c, err = st.Open("vol", cow.OpenOptions{}); err != nil {
				t.Fatal(err)
			}
			verify("reopened")
			if got := readAll(t, st, "small"); !bytes.Equal(got, small) {
				t.Fatalf("the snapshot taken before the grow changed (size %d, want %d)", len(got), len(small))
			}
			if probs, err := st.Check(false); err != nil || len(probs) > 0 {
				t.Fatalf("check: %v %v", err, probs)
			}
		})
	}
}
