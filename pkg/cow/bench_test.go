package cow_test

// Benchmarks of the engine (docs/PERFORMANCE.md has results and how to read them):
//
//	go test -run xxx -bench . -timeout 30m ./pkg/cow
//
// Speeds are only meaningful as ratios to the plain-file baseline measured in the same run
// (metric x-plain: plain ns/op divided by this ns/op, so 1.0 is as fast as pread/pwrite on a
// plain file); nothing here asserts a speed. The hot paths must show 0 allocs/op.
//
// Fixtures are built once per run under $RAWCOW_BENCH_DIR (default the system temp
// directory; use a directory on the file system you care about, e.g. /work's ext4) and
// removed by TestMain at the end. The run needs about 12 GiB free there.

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

const (
	kib = 1 << 10
	mib = 1 << 20
	gib = 1 << 30
	tib = 1 << 40

	benchIO        = 4 * kib   // one random I/O
	benchWorkSet   = 256 * mib // random I/O stays in [0, benchWorkSet): page cache, not the disk
	benchBaseSize  = 1 * gib   // the base image; its first half holds data
	benchBaseData  = benchBaseSize / 2
	benchPlainSize = 1 * gib
	// benchVolSize is the virtual size of the chain volumes, and of the plain file for first
	// writes: room for a distinct never-written block per first write of any run.
	benchVolSize     = 16 * gib
	benchLayerWrites = 1000 // scattered 4 KiB writes in each frozen layer
	benchWorkers     = 4    // goroutines issuing I/O, whatever GOMAXPROCS is
)

// benchDepths are the chain depths measured: layers of the volume above its base image, the
// writable top included (Chain.Depth counts the base too). depth=1 is a fresh clone of an
// image; depth=128 has 127 frozen layers of scattered writes between base and top.
var benchDepths = []int{1, 16, 128}

var (
	benchRootOnce sync.Once
	benchRoot     string
	benchRootErr  error
)

// TestMain removes the benchmark fixtures after the run; tests are not affected.
func TestMain(m *testing.M) {
	code := m.Run()
	chainFix.close()
	if benchRoot != "" {
		os.RemoveAll(benchRoot)
	}
	os.Exit(code)
}

// benchDir returns a fresh directory under the run's fixture root.
func benchDir(b *testing.B, name string) string {
	b.Helper()
	benchRootOnce.Do(func() {
		benchRoot, benchRootErr = os.MkdirTemp(os.Getenv("RAWCOW_BENCH_DIR"), "rawcow-bench-")
	})
	if benchRootErr != nil {
		b.Fatal(benchRootErr)
	}
	dir, err := os.MkdirTemp(benchRoot, name+"-")
	if err != nil {
		b.Fatal(err)
	}
	return dir
}

// needSpace skips the benchmark when dir's file system has less than n bytes free.
func needSpace(b *testing.B, dir string, n int64) {
	b.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		b.Fatal(err)
	}
	if free := int64(st.Bavail) * st.Bsize; free < n {
		b.Skipf("%s has %d MiB free, this benchmark needs %d MiB", dir, free/mib, n/mib)
	}
}

// benchPattern is non-zero data to write: its content does not matter, only that the
// file system stores it as data.
var benchPattern = func() []byte {
	p := make([]byte, mib)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range p {
		p[i] = byte(r.Uint32()) | 1
	}
	return p
}()

// fillFile writes benchPattern over [off, off+n) of f in 1 MiB pieces.
func fillFile(b *testing.B, f interface {
	WriteAt([]byte, int64) (int, error)
}, off, n int64) {
	b.Helper()
	for n > 0 {
		c := min(n, int64(len(benchPattern)))
		if _, err := f.WriteAt(benchPattern[:c], off); err != nil {
			b.Fatal(err)
		}
		off, n = off+c, n-c
	}
}

// createSparse makes a sparse file of size bytes at path, with [0, data) written.
func createSparse(b *testing.B, path string, size, data int64) *os.File {
	b.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	fillFile(b, f, 0, data)
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	return f
}

// chainFixture is built once per run and shared by the random I/O benchmarks: a base image
// with data in its first half, a volume over it, and 127 snapshots (L001..L127) of it, each
// adding 1000 scattered 4 KiB writes in the working set. A clone of L(d-1) has depth d.
type chainFixture struct {
	once  sync.Once
	err   error
	dir   string
	st    *cow.Store
	plain *os.File // benchPlainSize, [0, benchWorkSet) written

	mu     sync.Mutex
	chains map[string]*cow.Chain // open volumes, closed by close
}

var chainFix chainFixture

func (fx *chainFixture) get(b *testing.B) *chainFixture {
	b.Helper()
	fx.once.Do(func() { fx.err = fx.build(b) })
	if fx.err != nil {
		b.Fatal(fx.err)
	}
	return fx
}

func (fx *chainFixture) build(b *testing.B) error {
	start := time.Now()
	fx.dir = benchDir(b, "chain")
	needSpace(b, fx.dir, 6*gib)
	fx.chains = map[string]*cow.Chain{}
	fx.plain = createSparse(b, filepath.Join(fx.dir, "plain.raw"), benchPlainSize, benchWorkSet)
	base := filepath.Join(fx.dir, "base.raw")
	createSparse(b, base, benchBaseSize, benchBaseData).Close()
	st, err := cow.OpenStore(filepath.Join(fx.dir, "store"))
	if err != nil {
		return err
	}
	fx.st = st
	if err := st.Create("layers", cow.CreateOptions{Base: base, Size: benchVolSize}); err != nil {
		return err
	}
	c, err := st.Open("layers", cow.OpenOptions{})
	if err != nil {
		return err
	}
	defer c.Close()
	r := rand.New(rand.NewPCG(3, 4))
	for l := 1; l < benchDepths[len(benchDepths)-1]; l++ {
		for range benchLayerWrites {
			off := r.Int64N(benchWorkSet/benchIO) * benchIO
			if _, err := c.WriteAt(benchPattern[off%mib:][:benchIO], off); err != nil {
				return err
			}
		}
		if err := c.Snapshot(fmt.Sprintf("L%03d", l), nil); err != nil {
			return err
		}
	}
	b.Logf("chain fixture: base %d MiB of data, %d frozen layers of %d writes, built in %v in %s",
		benchBaseData/mib, benchDepths[len(benchDepths)-1]-1, benchLayerWrites, time.Since(start).Round(time.Millisecond), fx.dir)
	return nil
}

// newVolume makes volume name at depth d (see benchDepths).
func (fx *chainFixture) newVolume(name string, d int) error {
	if d == 1 {
		return fx.st.Create(name, cow.CreateOptions{Base: filepath.Join(fx.dir, "base.raw"), Size: benchVolSize})
	}
	return fx.st.Clone(fmt.Sprintf("L%03d", d-1), name, nil)
}

// volume returns the open volume name at depth d, creating it (and running prep on it) the
// first time.
func (fx *chainFixture) volume(b *testing.B, name string, d int, prep func(*cow.Chain)) *cow.Chain {
	b.Helper()
	fx.mu.Lock()
	defer fx.mu.Unlock()
	if c := fx.chains[name]; c != nil {
		return c
	}
	if err := fx.newVolume(name, d); err != nil {
		b.Fatal(err)
	}
	c, err := fx.st.Open(name, cow.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if got := c.Depth(); got != d+1 {
		b.Fatalf("%s: Chain.Depth %d, want %d", name, got, d+1)
	}
	if prep != nil {
		prep(c)
	}
	fx.chains[name] = c
	return c
}

func (fx *chainFixture) close() {
	for _, c := range fx.chains {
		c.Close()
	}
	if fx.plain != nil {
		fx.plain.Close()
	}
}

// plainNs remembers the ns/op of each plain baseline, for the x-plain ratios of the
// sub-benchmarks that follow it in the same run.
var plainNs sync.Map // string -> float64

func nsPerOp(b *testing.B) float64 { return float64(b.Elapsed().Nanoseconds()) / float64(b.N) }

// reportIO reports IOPS and, when its plain baseline ran before, the ratio to it.
func reportIO(b *testing.B, kind string, plain bool) {
	ns := nsPerOp(b)
	b.ReportMetric(1e9/ns, "IOPS")
	if plain {
		plainNs.Store(kind, ns)
		return
	}
	if p, ok := plainNs.Load(kind); ok {
		b.ReportMetric(p.(float64)/ns, "x-plain")
	}
}

// runWorkers runs op b.N times in total on benchWorkers goroutines. Each goroutine has its
// own id (0..), random source and 4 KiB buffer; op returns false to stop on an error.
func runWorkers(b *testing.B, op func(id int, r *rand.Rand, buf []byte) bool) {
	procs := runtime.GOMAXPROCS(0)
	b.SetParallelism((benchWorkers + procs - 1) / procs)
	var ids atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		id := int(ids.Add(1) - 1)
		r := rand.New(rand.NewPCG(uint64(id), 5))
		buf := make([]byte, benchIO)
		copy(buf, benchPattern)
		for pb.Next() {
			if !op(id, r, buf) {
				return
			}
		}
	})
	b.StopTimer()
}

func randOff(r *rand.Rand, span int64) int64 { return r.Int64N(span/benchIO) * benchIO }

// BenchmarkRandRead reads 4 KiB at random aligned offsets of a 256 MiB working set with 4
// goroutines: pread of a plain file against a chain's ReadAt at several depths.
func BenchmarkRandRead(b *testing.B) {
	b.Run("plain", func(b *testing.B) {
		f := chainFix.get(b).plain
		runWorkers(b, func(_ int, r *rand.Rand, buf []byte) bool {
			if _, err := f.ReadAt(buf, randOff(r, benchWorkSet)); err != nil {
				b.Error(err)
				return false
			}
			return true
		})
		reportIO(b, "read", true)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d", d), func(b *testing.B) {
			c := chainFix.get(b).volume(b, fmt.Sprintf("read%d", d), d, nil)
			runWorkers(b, func(_ int, r *rand.Rand, buf []byte) bool {
				if _, err := c.ReadAt(buf, randOff(r, benchWorkSet)); err != nil {
					b.Error(err)
					return false
				}
				return true
			})
			reportIO(b, "read", false)
		})
	}
}

// permBlock maps the i-th first write to a distinct block of a benchVolSize file: an odd
// multiplier is a bijection modulo a power of two, and scatters consecutive i.
func permBlock(i int64) int64 {
	const blocks = benchVolSize / benchIO // a power of two
	return ((i * 0x9E3779B1) & (blocks - 1)) * benchIO
}

// BenchmarkRandWrite writes 4 KiB at random aligned offsets with 4 goroutines. steady: the
// blocks are already written (plain file) or already held by the top (chain: the top was
// filled over the working set first), so no copy-up and no index change. first: every write
// hits a block never written before (plain: a hole of a sparse file; chain: a block the top
// lacks, so the index changes), over a fresh 16 GiB file or clone for each round.
func BenchmarkRandWrite(b *testing.B) {
	b.Run("plain/steady", func(b *testing.B) {
		f := chainFix.get(b).plain
		runWorkers(b, func(_ int, r *rand.Rand, buf []byte) bool {
			if _, err := f.WriteAt(buf, randOff(r, benchWorkSet)); err != nil {
				b.Error(err)
				return false
			}
			return true
		})
		reportIO(b, "write-steady", true)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d/steady", d), func(b *testing.B) {
			c := chainFix.get(b).volume(b, fmt.Sprintf("steady%d", d), d, func(c *cow.Chain) {
				fillFile(b, c, 0, benchWorkSet)
			})
			runWorkers(b, func(_ int, r *rand.Rand, buf []byte) bool {
				if _, err := c.WriteAt(buf, randOff(r, benchWorkSet)); err != nil {
					b.Error(err)
					return false
				}
				return true
			})
			reportIO(b, "write-steady", false)
		})
	}
	b.Run("plain/first", func(b *testing.B) {
		fx := chainFix.get(b)
		path := filepath.Join(fx.dir, "first.raw")
		f := createSparse(b, path, benchVolSize, 0)
		defer os.Remove(path)
		defer f.Close()
		var next atomic.Int64
		runWorkers(b, func(_ int, _ *rand.Rand, buf []byte) bool {
			if _, err := f.WriteAt(buf, permBlock(next.Add(1)-1)); err != nil {
				b.Error(err)
				return false
			}
			return true
		})
		reportIO(b, "write-first", true)
	})
	round := 0
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d/first", d), func(b *testing.B) {
			fx := chainFix.get(b)
			round++
			name := fmt.Sprintf("first%d-%d", d, round)
			if err := fx.newVolume(name, d); err != nil {
				b.Fatal(err)
			}
			c, err := fx.st.Open(name, cow.OpenOptions{})
			if err != nil {
				b.Fatal(err)
			}
			var next atomic.Int64
			runWorkers(b, func(_ int, _ *rand.Rand, buf []byte) bool {
				if _, err := c.WriteAt(buf, permBlock(next.Add(1)-1)); err != nil {
					b.Error(err)
					return false
				}
				return true
			})
			reportIO(b, "write-first", false)
			if err := c.Close(); err != nil {
				b.Fatal(err)
			}
			if err := fx.st.DeleteVolume(name); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// heapInuse returns the heap in use after a full collection.
func heapInuse() (inuse, totalAlloc uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse, ms.TotalAlloc
}

// BenchmarkOpenMillionExtents opens a volume whose layer holds 1,000,000 extents (4 KiB
// written every 8 KiB over 8 GiB: 4 GiB of data, built once per run). top: the extents are
// in the writable top (Store.Open readies it: FIEMAP with sync, punch of unwritten
// extents). frozen: they are in a frozen layer under an empty top. MB-heap is the heap the
// open chain keeps (HeapInuse after GC, open minus before); MB-alloc what the open
// allocated in all. Goal: < 2 s and < 64 MB.
func BenchmarkOpenMillionExtents(b *testing.B) {
	const n = 1_000_000
	const size = 2 * n * benchIO
	dir := benchDir(b, "million")
	needSpace(b, dir, n*benchIO+2*gib)
	defer os.RemoveAll(dir)
	st, err := cow.OpenStore(dir)
	if err != nil {
		b.Fatal(err)
	}
	if err := st.Create("m", cow.CreateOptions{Size: size}); err != nil {
		b.Fatal(err)
	}
	info, err := st.Info("m")
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	f, err := os.OpenFile(info.Layers[len(info.Layers)-1].Path, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 2 { // two writers: the syscalls, not the disk, are the build's cost
		wg.Go(func() {
			for i := int64(w); i < n; i += 2 {
				if _, err := f.WriteAt(benchPattern[:benchIO], 2*i*benchIO); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		b.Fatal(err)
	}
	f.Close()
	b.Logf("wrote %d extents (%d MiB) in %v", n, n*benchIO/mib, time.Since(start).Round(time.Millisecond))

	open := func(b *testing.B, wantDepth int) {
		var maxHeap, maxAlloc float64
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			before, alloc0 := heapInuse()
			b.StartTimer()
			c, err := st.Open("m", cow.OpenOptions{})
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			after, alloc1 := heapInuse()
			maxHeap = max(maxHeap, float64(int64(after)-int64(before))/1e6)
			maxAlloc = max(maxAlloc, float64(alloc1-alloc0)/1e6)
			if i == 0 {
				if got := len(c.Allocated()); got != n || c.Depth() != wantDepth {
					b.Fatalf("open chain: %d extents, depth %d; want %d, %d", got, c.Depth(), n, wantDepth)
				}
			}
			runtime.KeepAlive(c)
			if err := c.Close(); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		b.ReportMetric(maxHeap, "MB-heap")
		b.ReportMetric(maxAlloc, "MB-alloc")
	}
	b.Run("top", func(b *testing.B) { open(b, 1) })
	if err := st.Snapshot("m", "m-snap", nil); err != nil {
		b.Fatal(err)
	}
	b.Run("frozen", func(b *testing.B) { open(b, 2) })
}

var benchSizes = []struct {
	name string
	size int64
}{{"1GiB", gib}, {"100GiB", 100 * gib}, {"1TiB", tib}}

// sizeFixture makes a store with volume "v" of the given size holding some data: 64 pieces
// of 64 KiB spread over the whole volume.
func sizeFixture(b *testing.B, size int64) *cow.Store {
	b.Helper()
	st, err := cow.OpenStore(benchDir(b, "size"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(st.Dir()) })
	if err := st.Create("v", cow.CreateOptions{Size: size}); err != nil {
		b.Fatal(err)
	}
	c, err := st.Open("v", cow.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	for i := range int64(64) {
		fillFile(b, c, alignBlock(i*(size/64)), 64*kib)
	}
	if err := c.Close(); err != nil {
		b.Fatal(err)
	}
	return st
}

func alignBlock(off int64) int64 { return off &^ (cow.BlockSize - 1) }

// touch writes one 4 KiB block of volume v (offline), so that its top holds data.
func touch(b *testing.B, st *cow.Store, i int, size int64) {
	b.Helper()
	c, err := st.Open("v", cow.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := c.WriteAt(benchPattern[:benchIO], alignBlock(int64(i)*7919*benchIO%size)); err != nil {
		b.Fatal(err)
	}
	if err := c.Close(); err != nil {
		b.Fatal(err)
	}
}

// liveChain keeps volume v open, as a server does, and reopens it now and then so that
// layers the benchmark leaves behind (merged away only once the chain is closed) do not
// pile up.
type liveChain struct {
	b  *testing.B
	st *cow.Store
	c  *cow.Chain
}

func openLive(b *testing.B, st *cow.Store) *liveChain {
	l := &liveChain{b: b, st: st}
	l.reopen()
	return l
}

func (l *liveChain) reopen() {
	if l.c != nil {
		if err := l.c.Close(); err != nil {
			l.b.Fatal(err)
		}
		if err := l.st.Collect(); err != nil {
			l.b.Fatal(err)
		}
	}
	c, err := l.st.Open("v", cow.OpenOptions{})
	if err != nil {
		l.b.Fatal(err)
	}
	l.c = c
}

// step is called untimed after each iteration.
func (l *liveChain) step(i int) {
	if i%32 == 31 {
		l.reopen()
	}
	if _, err := l.c.WriteAt(benchPattern[:benchIO], alignBlock(int64(i)*7919*benchIO%l.c.Size())); err != nil {
		l.b.Fatal(err)
	}
}

func (l *liveChain) close() {
	if err := l.c.Close(); err != nil {
		l.b.Fatal(err)
	}
}

// BenchmarkSnapshot times taking a snapshot of a volume whose top holds fresh writes, at
// several virtual sizes: offline (Store.Snapshot, volume closed) and live (Chain.Snapshot
// on the open volume: quiesce, flush, freeze, new top). Each snapshot is deleted (merged)
// untimed before the next. Goal: < 50 ms, flat across sizes.
func BenchmarkSnapshot(b *testing.B) {
	for _, sz := range benchSizes {
		b.Run("size="+sz.name, func(b *testing.B) {
			st := sizeFixture(b, sz.size)
			b.Run("offline", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					touch(b, st, i, sz.size)
					b.StartTimer()
					if err := st.Snapshot("v", "s", nil); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if err := st.DeleteSnapshot("s"); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
			b.Run("live", func(b *testing.B) {
				l := openLive(b, st)
				defer l.close()
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					l.step(i)
					b.StartTimer()
					if err := l.c.Snapshot("s", nil); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if err := st.DeleteSnapshot("s"); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
		})
	}
}

// BenchmarkClone times making a new volume over a snapshot (Store.Clone from a snapshot),
// over a closed volume whose top holds fresh writes (the top is frozen first), and over an
// open one (live freeze), at several virtual sizes. Each clone is deleted untimed.
// Goal: < 50 ms, flat across sizes.
func BenchmarkClone(b *testing.B) {
	for _, sz := range benchSizes {
		b.Run("size="+sz.name, func(b *testing.B) {
			st := sizeFixture(b, sz.size)
			if err := st.Snapshot("v", "snap", nil); err != nil {
				b.Fatal(err)
			}
			del := func(b *testing.B) {
				b.StopTimer()
				if err := st.DeleteVolume("clone"); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.Run("from=snapshot", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					if err := st.Clone("snap", "clone", nil); err != nil {
						b.Fatal(err)
					}
					del(b)
				}
			})
			b.Run("from=volume", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					touch(b, st, i, sz.size)
					b.StartTimer()
					if err := st.Clone("v", "clone", nil); err != nil {
						b.Fatal(err)
					}
					del(b)
				}
			})
			b.Run("from=volume/live", func(b *testing.B) {
				l := openLive(b, st)
				defer l.close()
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					l.step(i)
					b.StartTimer()
					if err := st.Clone("v", "clone", nil); err != nil {
						b.Fatal(err)
					}
					del(b)
				}
			})
		})
	}
}

// BenchmarkMerge times DeleteSnapshot of a snapshot whose layer holds data, merged into its
// child (the volume's empty top): the data is copied with copy_file_range and synced.
// The data lies in 1 MiB pieces spread over the whole volume. MiB/s is data merged per
// second; the time should follow the data, not the virtual size.
func BenchmarkMerge(b *testing.B) {
	cases := []struct {
		name       string
		data, size int64
	}{
		{"data=256MiB/size=100GiB", 256 * mib, 100 * gib},
		{"data=1GiB/size=100GiB", gib, 100 * gib},
		{"data=256MiB/size=1TiB", 256 * mib, tib},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			dir := benchDir(b, "merge")
			defer os.RemoveAll(dir)
			needSpace(b, dir, 3*tc.data+gib)
			st, err := cow.OpenStore(dir)
			if err != nil {
				b.Fatal(err)
			}
			if err := st.Create("v", cow.CreateOptions{Size: tc.size}); err != nil {
				b.Fatal(err)
			}
			c, err := st.Open("v", cow.OpenOptions{})
			if err != nil {
				b.Fatal(err)
			}
			pieces := tc.data / mib
			for i := range pieces {
				fillFile(b, c, alignBlock(i*(tc.size/pieces)), mib)
			}
			if err := c.Close(); err != nil {
				b.Fatal(err)
			}
			// Each round: the top (holding the data) becomes snapshot s, and deleting s
			// merges its data back into the new, empty top.
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				if err := st.Snapshot("v", "s", nil); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := st.DeleteSnapshot("s"); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			info, err := st.Info("v")
			if err != nil {
				b.Fatal(err)
			}
			if len(info.Layers) != 1 || info.Allocated != tc.data {
				b.Fatalf("after merge: %d layers, %d bytes allocated; want 1, %d", len(info.Layers), info.Allocated, tc.data)
			}
			b.ReportMetric(float64(tc.data)/mib/(nsPerOp(b)/1e9), "MiB/s")
		})
	}
}
