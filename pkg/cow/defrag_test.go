package cow

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
)

// TestComposeDefragments composes, on xfs and btrfs, a volume whose top holds 64 scattered
// blocks in one 1 MiB region of a base, 4 in another and 32 in the last, half a region: the
// first and the last come out as contiguous copies, the second stays shared with the base,
// and so does a region where the base itself has 32 runs; the volume reads the same.
func TestComposeDefragments(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			dir := testfs.Mount(t, kind, 1<<30)
			base := filepath.Join(dir, "base.raw")
			data := make([]byte, 8*mib+mib/2)
			r := rand.New(rand.NewPCG(3, 4))
			for i := range data {
				data[i] = byte(r.Uint32())
			}
			if err := os.WriteFile(base, data, 0o600); err != nil {
				t.Fatal(err)
			}
			// The base's own layout: 32 runs of 16 KiB in [6 MiB, 7 MiB), no layer over them.
			bf, err := os.OpenFile(base, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			for off := int64(6*mib + 16<<10); off < 7*mib; off += 32 << 10 {
				if err := punchHole(bf, off, 16<<10); err != nil {
					t.Fatal(err)
				}
			}
			bf.Close()
			st, err := OpenStore(filepath.Join(dir, "store"))
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Create("vol", CreateOptions{Base: base}); err != nil {
				t.Fatal(err)
			}
			c, err := st.Open("vol", OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			block := bytes.Repeat([]byte{0xd5}, BlockSize)
			var writes []int64
			for i := int64(0); i < 64; i++ { // every fourth block of [1 MiB, 2 MiB)
				writes = append(writes, 1*mib+i*4*BlockSize)
			}
			for i := int64(0); i < 4; i++ { // 4 blocks of [4 MiB, 5 MiB): under the limit
				writes = append(writes, 4*mib+i*64*BlockSize)
			}
			for i := int64(0); i < 32; i++ { // every fourth block of the last half region
				writes = append(writes, 8*mib+i*4*BlockSize)
			}
			for _, off := range writes {
				if _, err := c.WriteAt(block, off); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			want := viewOf(t, st, "vol")
			if err := st.Compose("vol"); err != nil {
				t.Fatal(err)
			}
			if got := viewOf(t, st, "vol"); !bytes.Equal(got, want) {
				t.Fatal("the composed volume reads differently")
			}
			top, opaque, err := st.TopPath("vol")
			if err != nil || !opaque {
				t.Fatalf("top %s opaque=%v: %v", top, opaque, err)
			}
			topExt, baseExt := physOf(t, top, int64(len(data))), physOf(t, base, int64(len(data)))
			var topRanges []Extent
			for _, e := range topExt {
				topRanges = append(topRanges, e.Extent)
			}
			for _, r := range []Extent{{Off: 1 * mib, Len: mib}, {Off: 8 * mib, Len: mib / 2}} {
				if n := countIn(topRanges, r); n > 2 {
					t.Errorf("the fragmented region at %d has %d extents after compose, want it rewritten in one", r.Off, n)
				}
			}
			shared := sharedRanges(topExt, baseExt)
			if n := countIn(shared, Extent{Off: 1 * mib, Len: mib}); n != 0 {
				t.Errorf("the rewritten region still shares %d ranges with the base", n)
			}
			// The region under the limit: every block but the 4 written stays a clone. The
			// base's own runs are not the composing's doing: they stay clones, all 32.
			sharedIn := func(r Extent) (n int64) {
				for _, e := range shared {
					n += max(0, min(e.End(), r.End())-max(e.Off, r.Off))
				}
				return n
			}
			if got := sharedIn(Extent{Off: 4 * mib, Len: mib}); got != mib-4*BlockSize {
				t.Errorf("the region under the limit shares %d bytes with the base, want %d", got, mib-4*BlockSize)
			}
			if got := sharedIn(Extent{Off: 6 * mib, Len: mib}); got != mib/2 {
				t.Errorf("the region of the base's own runs shares %d bytes with the base, want %d", got, mib/2)
			}
		})
	}
}

// physOf returns the physical extents of the file at path below size.
func physOf(t *testing.T, path string, size int64) []physExtent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ext, err := physicalExtents(f, size)
	if err != nil {
		t.Fatal(err)
	}
	return ext
}

// countIn returns how many of the extents overlap r.
func countIn(list []Extent, r Extent) int {
	n := 0
	for _, e := range list {
		if e.Off < r.End() && e.End() > r.Off {
			n++
		}
	}
	return n
}
