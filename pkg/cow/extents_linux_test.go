package cow

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
)

// newSparse creates an empty file of the given size in dir, closed at cleanup.
func newSparse(t testing.TB, dir string, size int64) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "layer"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

func writeAt(t testing.TB, f *os.File, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	for i := range buf {
		buf[i] = byte(off>>12) | 1
	}
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatal(err)
	}
}

func fallocate(t testing.TB, f *os.File, mode uint32, off, n int64) {
	t.Helper()
	if err := unix.Fallocate(int(f.Fd()), mode, off, n); err != nil {
		t.Fatalf("fallocate(%#x, %d, %d): %v", mode, off, n, err)
	}
}

func checkData(t testing.TB, f *os.File, size int64, want []Extent) {
	t.Helper()
	got, err := dataExtents(f, size)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("dataExtents = %v, want %v", got, want)
	}
}

func checkUnwritten(t testing.TB, f *os.File, size int64, want []Extent) {
	t.Helper()
	got, err := unwrittenExtents(f, size)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("unwrittenExtents = %v, want %v", got, want)
	}
}

// seekData is the SEEK_DATA/SEEK_HOLE view of f, for comparison with FIEMAP.
func seekData(t testing.TB, f *os.File, size int64) []Extent {
	t.Helper()
	got, err := seekDataIn(f, 0, size)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestAppendCoalesced(t *testing.T) {
	var l []Extent
	for _, r := range [][2]int64{{0, 4}, {4, 8}, {6, 7}, {6, 10}, {12, 16}, {16, 16 + 4}, {30, 31}} {
		l = appendCoalesced(l, r[0], r[1])
	}
	want := []Extent{{0, 10}, {12, 8}, {30, 1}}
	if !slices.Equal(l, want) {
		t.Fatalf("got %v, want %v", l, want)
	}
}

// TestExtents checks dataExtents, unwrittenExtents and punchHole on every file
// system kind against what was written, fallocated and punched.
//
// What the file systems report for a range fallocated inside the file (mode 0 or
// FALLOC_FL_KEEP_SIZE), measured on Linux 6.18:
//   - ext4, xfs, btrfs: FIEMAP flags it UNWRITTEN (btrfs: a PREALLOC extent), so it
//     is not data and unwrittenExtents returns it exactly; SEEK_DATA treats it as a
//     hole on all three. A 4 KiB write into its middle becomes exactly 4 KiB of
//     data, splitting the unwritten range in two.
//   - tmpfs: no FIEMAP (EOPNOTSUPP), so unwrittenExtents is always nil; SEEK_DATA
//     treats fallocated pages as holes until written (they are not uptodate) and
//     a 4 KiB write into them becomes exactly 4 KiB of data.
//
// Fallocated space past the size passed in is clipped away.
func TestExtents(t *testing.T) {
	for _, kind := range testfs.Kinds() {
		t.Run(kind, func(t *testing.T) {
			mnt := testfs.Mount(t, kind, 512*mib)
			const size = 64 * mib
			f := newSparse(t, mnt, size)
			fiemap := kind != "tmpfs"

			checkData(t, f, size, nil)
			checkUnwritten(t, f, size, nil)
			if _, err := dataExtents(f, 0); err != nil {
				t.Fatal(err)
			}

			// Scattered 4 KiB writes; adjacent ones coalesce.
			for _, off := range []int64{0, 8 * kib, 1 * mib, 1*mib + 4*kib, 1*mib + 8*kib, 33*mib + 12*kib, size - 4*kib} {
				writeAt(t, f, off, 4*kib)
			}
			written := []Extent{{0, 4 * kib}, {8 * kib, 4 * kib}, {1 * mib, 12 * kib}, {33*mib + 12*kib, 4 * kib}, {size - 4*kib, 4 * kib}}
			checkData(t, f, size, written)
			checkUnwritten(t, f, size, nil)
			if got := seekData(t, f, size); !slices.Equal(got, written) {
				t.Errorf("SEEK_DATA view %v, want %v", got, written)
			}
			// Clipping to a smaller size.
			checkData(t, f, 1*mib+6*kib, []Extent{{0, 4 * kib}, {8 * kib, 4 * kib}, {1 * mib, 6 * kib}})

			// Fallocated ranges: mode 0 and KEEP_SIZE inside the size, and KEEP_SIZE
			// beyond it (must be clipped away).
			fallocate(t, f, 0, 16*mib, 1*mib)
			fallocate(t, f, unix.FALLOC_FL_KEEP_SIZE, 40*mib, 256*kib)
			fallocate(t, f, unix.FALLOC_FL_KEEP_SIZE, size, 1*mib)
			if st, err := f.Stat(); err != nil || st.Size() != size {
				t.Fatalf("size after fallocate: %v %v", st, err)
			}
			checkData(t, f, size, written)
			if got := seekData(t, f, size); !slices.Equal(got, written) {
				t.Errorf("SEEK_DATA view after fallocate %v, want %v", got, written)
			}
			var unwritten []Extent
			if fiemap {
				unwritten = []Extent{{16 * mib, 1 * mib}, {40 * mib, 256 * kib}}
			}
			checkUnwritten(t, f, size, unwritten)

			// A write into the middle of a fallocated range is data once synced
			// (FIEMAP_FLAG_SYNC does it; no explicit fsync here).
			writeAt(t, f, 16*mib+512*kib, 4*kib)
			withMid := slices.Clone(written)
			withMid = slices.Insert(withMid, 3, Extent{16*mib + 512*kib, 4 * kib})
			checkData(t, f, size, withMid)
			if fiemap {
				unwritten = []Extent{{16 * mib, 512 * kib}, {16*mib + 516*kib, 508 * kib}, {40 * mib, 256 * kib}}
			}
			checkUnwritten(t, f, size, unwritten)
			if d, u, err := layerExtents(f, size); err != nil || !slices.Equal(d, withMid) || !slices.Equal(u, unwritten) {
				t.Errorf("layerExtents = %v, %v, %v; want %v, %v", d, u, err, withMid, unwritten)
			}

			// Punching: a written block, the whole first fallocated range (with its
			// written block), and half of the second.
			for _, e := range []Extent{{1*mib + 4*kib, 4 * kib}, {16 * mib, 1 * mib}, {40 * mib, 128 * kib}} {
				if err := punchHole(f, e.Off, e.Len); err != nil {
					t.Fatal(err)
				}
			}
			if err := punchHole(f, 0, 0); err != nil {
				t.Fatal(err)
			}
			checkData(t, f, size, []Extent{{0, 4 * kib}, {8 * kib, 4 * kib}, {1 * mib, 4 * kib}, {1*mib + 8*kib, 4 * kib}, {33*mib + 12*kib, 4 * kib}, {size - 4*kib, 4 * kib}})
			if fiemap {
				unwritten = []Extent{{40*mib + 128*kib, 128 * kib}}
			}
			checkUnwritten(t, f, size, unwritten)
			buf := make([]byte, 4*kib)
			if _, err := f.ReadAt(buf, 1*mib+4*kib); err != nil || slices.ContainsFunc(buf, func(b byte) bool { return b != 0 }) {
				t.Errorf("punched block reads non-zero (%v)", err)
			}

			// No extent size hint outside xfs, and clearing is a no-op.
			if kind != "xfs" {
				if hint, err := extentSizeHint(f); err != nil || hint != 0 {
					t.Errorf("extentSizeHint = %d, %v; want 0", hint, err)
				}
				if err := clearExtentSizeHint(f); err != nil {
					t.Error(err)
				}
			}

			// Errors name the file.
			g, err := os.Open(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			g.Close()
			if _, err := dataExtents(g, size); err == nil || !containsName(err, g.Name()) {
				t.Errorf("dataExtents on a closed file: %v", err)
			}
			if err := punchHole(g, 0, 4*kib); err == nil || !containsName(err, g.Name()) {
				t.Errorf("punchHole on a closed file: %v", err)
			}
		})
	}
}

func containsName(err error, name string) bool {
	return err != nil && name != "" && strings.Contains(err.Error(), name)
}

// TestExtentSizeHintXFS checks that a file created in a directory with an
// inheritable extent size hint carries it, that clearExtentSizeHint removes it, and
// that a 4 KiB write then allocates exactly 4 KiB.
func TestExtentSizeHintXFS(t *testing.T) {
	mnt := testfs.Mount(t, "xfs", 0)
	dir := filepath.Join(mnt, "hinted")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	testfs.SetExtentSizeHint(t, dir, 1*mib)
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	hint, err := extentSizeHint(d)
	d.Close()
	if err != nil || hint != 1*mib {
		t.Fatalf("directory hint = %d, %v; want 1 MiB", hint, err)
	}

	const size = 64 * mib
	// A file that keeps the hint: a 4 KiB write allocates 1 MiB, the rest UNWRITTEN.
	kept := filepath.Join(dir, "kept")
	if err := os.Mkdir(kept, 0o755); err != nil {
		t.Fatal(err)
	}
	f := newSparse(t, kept, size)
	if hint, err := extentSizeHint(f); err != nil || hint != 1*mib {
		t.Fatalf("inherited hint = %d, %v; want 1 MiB", hint, err)
	}
	writeAt(t, f, 8*mib, 4*kib)
	checkData(t, f, size, []Extent{{8 * mib, 4 * kib}})
	checkUnwritten(t, f, size, []Extent{{8*mib + 4*kib, 1*mib - 4*kib}})

	// A fresh empty file with the hint cleared.
	f = newSparse(t, dir, 0)
	if hint, err := extentSizeHint(f); err != nil || hint != 1*mib {
		t.Fatalf("inherited hint = %d, %v; want 1 MiB", hint, err)
	}
	if err := clearExtentSizeHint(f); err != nil {
		t.Fatal(err)
	}
	if hint, err := extentSizeHint(f); err != nil || hint != 0 {
		t.Fatalf("hint after clear = %d, %v; want 0", hint, err)
	}
	if err := clearExtentSizeHint(f); err != nil { // no-op now
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	writeAt(t, f, 8*mib, 4*kib)
	checkData(t, f, size, []Extent{{8 * mib, 4 * kib}})
	checkUnwritten(t, f, size, nil)
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 != 4*kib {
		t.Errorf("allocated %d bytes, want 4096", st.Blocks*512)
	}
}

// TestExtentsMany maps a file of ~100k data extents (every other 4 KiB block
// written) and logs how long that takes.
func TestExtentsMany(t *testing.T) {
	if testing.Short() {
		t.Log("-short: 100k extents on ext4 only")
	}
	const n = 100_000
	const size = 2 * n * 4 * kib
	for _, kind := range testfs.Kinds() {
		if testing.Short() && kind != "ext4" {
			continue
		}
		t.Run(kind, func(t *testing.T) {
			mnt := testfs.Mount(t, kind, size+512*mib)
			f := newSparse(t, mnt, size)
			buf := make([]byte, 4*kib)
			for i := range buf {
				buf[i] = 0xa5
			}
			start := time.Now()
			for i := int64(0); i < n; i++ {
				if _, err := f.WriteAt(buf, 2*i*4*kib); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: wrote and synced %d blocks in %v", kind, n, time.Since(start))

			for round := 0; round < 2; round++ {
				start = time.Now()
				got, err := dataExtents(f, size)
				took := time.Since(start)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%s: dataExtents found %d extents in %v (round %d)", kind, len(got), took, round)
				if len(got) != n {
					t.Fatalf("%d extents, want %d", len(got), n)
				}
				for i, e := range got {
					if e != (Extent{int64(i) * 8 * kib, 4 * kib}) {
						t.Fatalf("extent %d = %v", i, e)
					}
				}
			}
			start = time.Now()
			if got := seekData(t, f, size); len(got) != n {
				t.Fatalf("SEEK_DATA view: %d extents, want %d", len(got), n)
			}
			t.Logf("%s: SEEK_DATA/SEEK_HOLE found them in %v", kind, time.Since(start))
			start = time.Now()
			u, err := unwrittenExtents(f, size)
			if err != nil || len(u) != 0 {
				t.Fatalf("unwrittenExtents: %d extents, %v", len(u), err)
			}
			t.Logf("%s: unwrittenExtents walked them in %v", kind, time.Since(start))
		})
	}
}

// BenchmarkFiemapMillion walks a file of 1,000,000 UNWRITTEN extents (every other
// 4 KiB block fallocated: cheap to make, the same FIEMAP walk as written data) with
// unwrittenExtents and dataExtents. Run with -bench FiemapMillion -benchtime 3x.
func BenchmarkFiemapMillion(b *testing.B) {
	const n = 1_000_000
	const size = 2 * n * 4 * kib
	for _, kind := range []string{"ext4", "xfs", "btrfs"} {
		b.Run(kind, func(b *testing.B) {
			mnt := testfs.Mount(b, kind, size)
			f := newSparse(b, mnt, size)
			start := time.Now()
			for i := int64(0); i < n; i++ {
				fallocate(b, f, unix.FALLOC_FL_KEEP_SIZE, 2*i*4*kib, 4*kib)
			}
			b.Logf("%s: fallocated %d extents in %v", kind, n, time.Since(start))
			var walks int
			var user, sys time.Duration
			b.ResetTimer()
			for b.Loop() {
				var r0, r1 unix.Rusage
				unix.Getrusage(unix.RUSAGE_SELF, &r0)
				u, err := unwrittenExtents(f, size)
				if err != nil {
					b.Fatal(err)
				}
				if len(u) != n {
					b.Fatalf("%d unwritten extents, want %d", len(u), n)
				}
				d, err := dataExtents(f, size)
				if err != nil || len(d) != 0 {
					b.Fatalf("dataExtents: %d, %v", len(d), err)
				}
				unix.Getrusage(unix.RUSAGE_SELF, &r1)
				walks += 2
				user += time.Duration(r1.Utime.Nano() - r0.Utime.Nano())
				sys += time.Duration(r1.Stime.Nano() - r0.Stime.Nano())
			}
			b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(walks), "ms/walk")
			b.ReportMetric(float64(user.Milliseconds())/float64(walks), "user-ms/walk")
			b.ReportMetric(float64(sys.Milliseconds())/float64(walks), "sys-ms/walk")
		})
	}
}
