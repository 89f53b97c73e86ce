package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mappedFixture makes, in a temp dir, a store with a volume over a far-style base (data,
// holes, a partial last block), a snapshot "snap" of it and two clones "a" and "b" of the
// snapshot. It returns the store, the base path and each name's merged view.
func mappedFixture(t *testing.T) (*Store, string, map[string][]byte) {
	t.Helper()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	writeFarBase(t, base)
	st, err := OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", CreateOptions{Base: base, Size: 32 * mib}); err != nil {
		t.Fatal(err)
	}
	c, err := st.Open("vol", OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte{0xb1}, 3*BlockSize+100), 2*mib-BlockSize); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(9*mib, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Snapshot("vol", "snap", nil); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	for _, name := range []string{"a", "b"} {
		if err := st.Clone("snap", name, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"snap", "a", "b"} {
		want[name] = viewOf(t, st, name)
	}
	if int64(len(want["a"])) != 32*mib || !bytes.Equal(want["a"][2*mib:2*mib+100], bytes.Repeat([]byte{0xb1}, 100)) {
		t.Fatal("fixture: the clone does not show the snapshot's write")
	}
	return st, base, want
}

// readAll reads c's whole view in reads of n bytes.
func readAll(t *testing.T, c *Chain, n int) []byte {
	t.Helper()
	out := make([]byte, c.Size())
	for off := 0; off < len(out); off += n {
		if _, err := c.ReadAt(out[off:min(off+n, len(out))], int64(off)); err != nil {
			t.Fatalf("read %s at %d: %v", c.Name(), off, err)
		}
	}
	return out
}

func wantMapped(t *testing.T, files int, span int64) {
	t.Helper()
	if f, s := fileMaps.usage(); f != files || s != span {
		t.Fatalf("mapped: %d files spanning %d bytes, want %d files spanning %d bytes", f, s, files, span)
	}
}

func TestMapSpan(t *testing.T) {
	for _, c := range []struct {
		data []Extent
		want int64
	}{
		{nil, 0},
		{[]Extent{{0, 4096}}, 2 * mib},
		{[]Extent{{0, 4096}, {8192, 4096}, {2*mib - 4096, 8192}}, 4 * mib},
		{[]Extent{{3 * mib, 2 * mib}}, 4 * mib},
		{[]Extent{{mib, mib}, {2 * mib, 1}, {10 * mib, 4 * mib}}, 2*mib + 2*mib + 4*mib},
	} {
		if got := mapSpan(c.data); got != c.want {
			t.Errorf("mapSpan(%v) = %d, want %d", c.data, got, c.want)
		}
	}
}

// Frozen layers and bases are read through one shared mapping per file, the top with pread;
// the mappings go when the last chain reading them closes.
func TestMappedReads(t *testing.T) {
	st, _, want := mappedFixture(t)
	wantMapped(t, 0, 0)
	var chains []*Chain
	for _, name := range []string{"a", "b"} {
		c, err := st.Open(name, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		chains = append(chains, c)
	}
	snap, err := st.OpenSnapshot("snap")
	if err != nil {
		t.Fatal(err)
	}
	chains = append(chains, snap)
	for _, c := range chains {
		for _, n := range []int{BlockSize, 1000, int(mib)} {
			if got := readAll(t, c, n); !bytes.Equal(got, want[c.Name()]) {
				t.Fatalf("%s read in pieces of %d differs from its export", c.Name(), n)
			}
		}
	}
	// The base and the snapshot's layer, once each for three chains; their spans are the 2 MiB
	// regions that hold data: the base's at 0, 2, 8 and 24 MiB, the layer's at 0 and 2 MiB.
	wantMapped(t, 2, 12*mib)

	// The clone's writes land in its top and read back; its frozen layers stay as they were.
	a := chains[0]
	if _, err := a.WriteAt(bytes.Repeat([]byte{0xc3}, BlockSize), 2*mib); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*BlockSize)
	if _, err := a.ReadAt(got, 2*mib-BlockSize); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:BlockSize], want["a"][2*mib-BlockSize:2*mib]) || !bytes.Equal(got[BlockSize:], bytes.Repeat([]byte{0xc3}, BlockSize)) {
		t.Fatal("a write into the clone's top does not read back over its frozen layer")
	}
	if got := readAll(t, chains[1], int(mib)); !bytes.Equal(got, want["b"]) {
		t.Fatal("the other clone changed")
	}

	// After a live snapshot the old top is frozen and read through a mapping too.
	if err := a.Snapshot("a-snap", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.ReadAt(got[:BlockSize], 2*mib); err != nil || !bytes.Equal(got[:BlockSize], bytes.Repeat([]byte{0xc3}, BlockSize)) {
		t.Fatalf("read from the frozen old top: %v", err)
	}
	wantMapped(t, 3, 12*mib+32*mib) // the frozen top counts whole: its data is not at hand
	for _, c := range chains {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	wantMapped(t, 0, 0)
}

// Past the budget, layers are read with pread and read the same.
func TestMappedReadsOverBudget(t *testing.T) {
	st, _, want := mappedFixture(t)
	defer func(b int64) { mapBudget = b }(mapBudget)
	mapBudget = 8 * mib // the base's span fits, the snapshot's layer's does not
	c, err := st.Open("a", OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := readAll(t, c, 64<<10); !bytes.Equal(got, want["a"]) {
		t.Fatal("read over budget differs from the export")
	}
	wantMapped(t, 1, 8*mib)
}

// A base truncated behind the store's back faults in the mapping: the read fails with EIO,
// the process goes on.
func TestMappedReadFault(t *testing.T) {
	st, base, _ := mappedFixture(t)
	c, err := st.OpenSnapshot("snap")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, BlockSize)
	if _, err := c.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(base, 0); err != nil {
		t.Fatal(err)
	}
	_, err = c.ReadAt(buf, 0)
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("read of a truncated base: %v, want EIO", err)
	}
	t.Logf("read of a truncated base: %v", err)
	// The snapshot's own layer still reads.
	if _, err := c.ReadAt(buf, 2*mib); err != nil || buf[0] != 0xb1 {
		t.Fatalf("read from the snapshot's layer after the fault: %v", err)
	}
}

// ReadView returns the same bytes as ReadAt, pieces of mapped layers in place, whatever the
// mix of top, frozen, base and holes, also when the read has more pieces than a view holds.
func TestReadView(t *testing.T) {
	st, _, _ := mappedFixture(t)
	c, err := st.Open("a", OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Every other block of the base's first 4 MiB in the top: 1024 pieces alternate there.
	for off := int64(0); off < 4*mib; off += 2 * BlockSize {
		if _, err := c.WriteAt(bytes.Repeat([]byte{byte(off>>13) | 1}, BlockSize), off); err != nil {
			t.Fatal(err)
		}
	}
	want := readAll(t, c, int(mib))
	// Block by block every read is one piece: reads of 1 MiB cross more pieces than one
	// lookup of the index collects (readBatch) and must read the same.
	if !bytes.Equal(want, readAll(t, c, BlockSize)) {
		t.Fatal("reads of 1 MiB differ from reads block by block")
	}
	for _, r := range []struct{ off, n int64 }{
		{0, 4 * mib}, // more pieces than a view holds
		{2*mib - BlockSize - 100, 3*BlockSize + 300},
		{8*mib - 5000, mib}, // hole, base data, the zero-list entry at 9M
		{12 * mib, 64 << 10},
		{32*mib - 1000, 4096}, // past the end: what exists
	} {
		buf := make([]byte, r.n)
		view, err := c.ReadView(buf, r.off, nil)
		if err != nil {
			t.Fatalf("view [%d, +%d): %v", r.off, r.n, err)
		}
		got, inPlace := []byte{}, 0
		for _, p := range view {
			got = append(got, p...)
			if !within(p, buf) {
				inPlace++
			}
		}
		c.EndView()
		end := min(r.off+r.n, 32*mib)
		if !bytes.Equal(got, want[r.off:end]) {
			t.Fatalf("view [%d, +%d): %d bytes in %d pieces differ from ReadAt", r.off, r.n, len(got), len(view))
		}
		if len(view) > maxViewPieces {
			t.Fatalf("view [%d, +%d) has %d pieces, the bound is %d", r.off, r.n, len(view), maxViewPieces)
		}
		t.Logf("view [%d, +%d): %d pieces, %d of them in place", r.off, r.n, len(view), inPlace)
		if r.off == 0 && inPlace == 0 {
			t.Fatal("no piece of the base was returned in place")
		}
	}
}

// within reports whether p lies inside buf.
func within(p, buf []byte) bool {
	if len(p) == 0 {
		return true
	}
	b0 := uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	p0 := uintptr(unsafe.Pointer(unsafe.SliceData(p)))
	return p0 >= b0 && p0+uintptr(len(p)) <= b0+uintptr(len(buf))
}

// A view holds the chain: Close waits for EndView, so the mappings outlive every reply.
func TestReadViewHoldsChain(t *testing.T) {
	st, _, want := mappedFixture(t)
	c, err := st.OpenSnapshot("snap")
	if err != nil {
		t.Fatal(err)
	}
	view, err := c.ReadView(make([]byte, mib), mib, nil)
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan error)
	go func() { closed <- c.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a view was out", err)
	case <-time.After(200 * time.Millisecond):
	}
	var got []byte
	for _, p := range view {
		got = append(got, p...)
	}
	if !bytes.Equal(got, want["snap"][mib:2*mib]) {
		t.Fatal("the view changed while held")
	}
	c.EndView()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	wantMapped(t, 0, 0)
}
