package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

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

func wantMapped(t *testing.T, files int, bytes int64) {
	t.Helper()
	if f, b := fileMaps.usage(); f != files || b != bytes {
		t.Fatalf("mapped: %d files of %d bytes, want %d files of %d bytes", f, b, files, bytes)
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
	// The base and the snapshot's layer, once each for three chains.
	wantMapped(t, 2, farBaseSize+32*mib)

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
	wantMapped(t, 3, farBaseSize+64*mib)
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
	mapBudget = farBaseSize // the base fits, the snapshot's layer does not
	c, err := st.Open("a", OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := readAll(t, c, 64<<10); !bytes.Equal(got, want["a"]) {
		t.Fatal("read over budget differs from the export")
	}
	wantMapped(t, 1, farBaseSize)
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
