package cow_test

// Benchmarks of the engine (docs/PERFORMANCE.md has results and how to read them):
//
//	go test -run xxx -bench . -timeout 30m ./pkg/cow
//
// Speeds are only meaningful as ratios to the plain-file baseline measured in the same run
// (metric x-plain: plain ns/op divided by this ns/op, so 1.0 is as fast as pread/pwrite on a
// plain file); nothing here asserts a speed. The hot paths must show 0 allocs/op.
//
// Fixtures are built once per run and removed by TestMain at the end: those of many small
// extents on a RAM-backed ext4 when run as root (makeScatterRoot says why; up to about
// 5 GiB of memory), the others in the temp directory or $RAWCOW_BENCH_DIR (about 4 GiB).

import (
	"bytes"
	"cmp"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
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
	// benchFirstSize is the size of the plain files and volumes (grown clones) for first
	// writes: room for a distinct never-written block per first write of any run.
	benchFirstSize   = 16 * gib
	benchLayerWrites = 1000 // scattered 4 KiB writes in each frozen layer
	benchWorkers     = 4    // goroutines issuing I/O, whatever GOMAXPROCS is
)

// benchDepths are the chain depths measured: layers of the volume above its base image, the
// writable top included (Chain.Depth counts the base too). depth=1 is a fresh clone of an
// image; depth=128 has 127 frozen layers of scattered writes between base and top.
var benchDepths = []int{1, 16, 128}

// fixtureRoot is a directory, made on first use, that holds fixtures until the run ends.
type fixtureRoot struct {
	once    sync.Once
	make    func() (dir string, cleanup func(), err error)
	dir     string
	cleanup func()
	err     error
}

var (
	// diskRoot holds fixtures with few extents, on the host's file system (the temp
	// directory, or $RAWCOW_BENCH_DIR).
	diskRoot = &fixtureRoot{make: makeDiskRoot}
	// scatterRoot holds fixtures of many small extents (scattered 4 KiB writes, a million
	// extents); see makeScatterRoot.
	scatterRoot = &fixtureRoot{make: makeScatterRoot}
)

// TestMain removes the benchmark fixtures after the run; tests are not affected.
func TestMain(m *testing.M) {
	code := m.Run()
	chainFix.close()
	for _, r := range []*fixtureRoot{scatterRoot, diskRoot} {
		if r.cleanup != nil {
			r.cleanup()
		}
	}
	os.Exit(code)
}

// sub returns a fresh directory under the root.
func (r *fixtureRoot) sub(b *testing.B, name string) string {
	b.Helper()
	r.once.Do(func() {
		r.dir, r.cleanup, r.err = r.make()
		if r.err == nil {
			b.Logf("fixtures in %s", r.dir)
		}
	})
	if r.err != nil {
		b.Fatal(r.err)
	}
	dir, err := os.MkdirTemp(r.dir, name+"-")
	if err != nil {
		b.Fatal(err)
	}
	return dir
}

func makeDiskRoot() (string, func(), error) {
	dir, err := os.MkdirTemp(os.Getenv("RAWCOW_BENCH_DIR"), "rawcow-bench-")
	return dir, func() { os.RemoveAll(dir) }, err
}

// makeScatterRoot makes the root for fixtures of many small extents: as root, an ext4 made
// for the run on a loop device (direct I/O) over a sparse image in /dev/shm; else, or when
// $RAWCOW_BENCH_DIR is set or memory is short, the disk root.
//
// Why: where the host's file system is mounted with -o discard (as /work's is on the machine
// of docs/PERFORMANCE.md), freeing a file issues one discard per extent, about 1 ms each on
// its virtual disk: removing a file of 100,000 extents took 81 s, so cleaning up these
// fixtures would take many minutes, and an image on the disk does not help (its own blocks
// end up as fragmented as the files in it). The engine and ext4 run the same code on a
// RAM-backed device; what changes is that writeback is cheap (say so when reading write
// numbers). It needs up to about 5 GiB of memory at a time.
func makeScatterRoot() (string, func(), error) {
	if os.Getenv("RAWCOW_BENCH_DIR") != "" || os.Geteuid() != 0 || memAvailable() < 12*gib {
		return makeDiskRoot()
	}
	for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			return makeDiskRoot()
		}
	}
	run := func(args ...string) (string, error) {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out)), nil
	}
	shm, err := os.MkdirTemp("/dev/shm", "rawcow-bench-")
	if err != nil {
		return makeDiskRoot()
	}
	mnt, err := os.MkdirTemp("", "rawcow-bench-ram-")
	if err != nil {
		os.RemoveAll(shm)
		return "", nil, err
	}
	image := filepath.Join(shm, "ext4.img")
	f, err := os.Create(image)
	if err == nil {
		err = f.Truncate(32 * gib) // sparse: memory is used as data is written
		f.Close()
	}
	var dev string
	if err == nil {
		dev, err = run("losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", image)
	}
	if err == nil {
		if _, err = run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", dev); err == nil {
			// discard: what the fixtures free goes back to /dev/shm at once.
			_, err = run("mount", "-t", "ext4", "-o", "discard", dev, mnt)
		}
		if err != nil {
			run("losetup", "-d", dev)
		}
	}
	cleanup := func() {
		if dev != "" {
			run("umount", mnt)
			run("losetup", "-d", dev)
		}
		os.Remove(mnt)
		os.RemoveAll(shm)
	}
	if err != nil {
		cleanup()
		return "", nil, err
	}
	return mnt, cleanup, nil
}

// memAvailable returns MemAvailable of /proc/meminfo in bytes, or 0.
func memAvailable() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "MemAvailable: %d kB", &kb); err == nil {
			return kb * kib
		}
	}
	return 0
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

// chainFixture is built once per run and shared by the random I/O benchmarks: a 1 GiB base
// image with data in its first half, a volume of the same size over it, and 127 snapshots (L001..L127) of it, each
// adding 1000 scattered 4 KiB writes in the working set. A clone of L(d-1) has depth d.
type chainFixture struct {
	built bool
	dir   string
	st    *cow.Store
	plain *os.File // benchPlainSize, [0, benchWorkSet) written

	mu     sync.Mutex
	chains map[string]*cow.Chain // open volumes, closed by close
}

var chainFix chainFixture

func (fx *chainFixture) get(b *testing.B) *chainFixture {
	b.Helper()
	if !fx.built {
		if err := fx.build(b); err != nil {
			b.Fatal(err)
		}
		fx.built = true
	}
	return fx
}

func (fx *chainFixture) build(b *testing.B) error {
	start := time.Now()
	fx.dir = scatterRoot.sub(b, "chain")
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
	if err := st.Create("layers", cow.CreateOptions{Base: base}); err != nil {
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
		return fx.st.Create(name, cow.CreateOptions{Base: filepath.Join(fx.dir, "base.raw")})
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

// close removes the fixture; a later get builds it again.
// topFile opens the file of volume name's top layer for writing, for a baseline that
// writes where the chain writes. Writing data into blocks the top already holds is
// invisible to the engine (no index change).
func (fx *chainFixture) topFile(b *testing.B, name string) *os.File {
	b.Helper()
	info, err := fx.st.Info(name)
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(info.Layers[len(info.Layers)-1].Path, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return f
}

func (fx *chainFixture) close() {
	for _, c := range fx.chains {
		c.Close()
	}
	if fx.plain != nil {
		fx.plain.Close()
	}
	if fx.dir != "" {
		os.RemoveAll(fx.dir)
	}
	*fx = chainFixture{}
}

// ioOp is one 4 KiB I/O of a worker: r is its random source, buf its 4 KiB buffer.
type ioOp func(r *rand.Rand, buf []byte) error

// runPool runs op n times in all on benchWorkers goroutines (whatever GOMAXPROCS is), which
// take batches of iterations from a shared counter, and returns the wall time.
func runPool(n int, op ioOp) (time.Duration, error) {
	const batch = 16
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	start := time.Now()
	for id := range benchWorkers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(id), 5))
			buf := make([]byte, benchIO)
			copy(buf, benchPattern)
			for {
				s := int(next.Add(batch) - batch)
				if s >= n {
					return
				}
				for range min(batch, n-s) {
					if err := op(r, buf); err != nil {
						mu.Lock()
						first = cmp.Or(first, err)
						mu.Unlock()
						next.Store(int64(n))
						return
					}
				}
			}
		})
	}
	wg.Wait()
	return time.Since(start), first
}

// benchSegments is how many alternating segments of baseline and measured operations
// benchRandIO runs.
const benchSegments = 8

// benchRandIO times b.N runs of op on 4 workers and reports IOPS. When base is set, as many
// base operations run untimed, in alternating segments with op's (base, op, base, op, ...):
// x-plain is then base time / op time, a ratio measured side by side, so that load other
// users put on a shared machine meanwhile weighs on both alike.
func benchRandIO(b *testing.B, op, base ioOp) {
	b.Helper()
	b.ReportAllocs()
	b.ResetTimer()
	b.StopTimer()
	segs := 1
	if base != nil {
		segs = benchSegments
	}
	var opTime, baseTime time.Duration
	for k := range segs {
		n := b.N / segs
		if k == segs-1 { // the last segment takes the remainder
			n = b.N - n*(segs-1)
		}
		if base != nil {
			d, err := runPool(n, base)
			if err != nil {
				b.Fatal(err)
			}
			baseTime += d
		}
		b.StartTimer()
		d, err := runPool(n, op)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		opTime += d
	}
	b.ReportMetric(float64(b.N)/opTime.Seconds(), "IOPS")
	if base != nil {
		b.ReportMetric(float64(baseTime)/float64(opTime), "x-plain")
	}
}

func randOff(r *rand.Rand, span int64) int64 { return r.Int64N(span/benchIO) * benchIO }

// readOp reads 4 KiB at a random aligned offset of the working set of f.
func readOp(f io.ReaderAt) ioOp {
	return func(r *rand.Rand, buf []byte) error {
		_, err := f.ReadAt(buf, randOff(r, benchWorkSet))
		return err
	}
}

// writeOp writes 4 KiB at a random aligned offset of the working set of f.
func writeOp(f io.WriterAt) ioOp {
	return func(r *rand.Rand, buf []byte) error {
		_, err := f.WriteAt(buf, randOff(r, benchWorkSet))
		return err
	}
}

// firstWriteOp writes 4 KiB into a block of f that no earlier call wrote (see permBlock).
func firstWriteOp(f io.WriterAt) ioOp {
	var next atomic.Int64
	return func(_ *rand.Rand, buf []byte) error {
		_, err := f.WriteAt(buf, permBlock(next.Add(1)-1))
		return err
	}
}

// BenchmarkRandRead reads 4 KiB at random aligned offsets of a 256 MiB working set with 4
// goroutines: pread of a plain file against a chain's ReadAt at several depths.
func BenchmarkRandRead(b *testing.B) {
	b.Run("plain", func(b *testing.B) {
		benchRandIO(b, readOp(chainFix.get(b).plain), nil)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d", d), func(b *testing.B) {
			fx := chainFix.get(b)
			c := fx.volume(b, fmt.Sprintf("read%d", d), d, nil)
			benchRandIO(b, readOp(c), readOp(fx.plain))
		})
	}
}

// permBlock maps the i-th first write to a distinct block of a benchFirstSize file: an odd
// multiplier is a bijection modulo a power of two, and scatters consecutive i.
func permBlock(i int64) int64 {
	const blocks = benchFirstSize / benchIO // a power of two
	return ((i * 0x9E3779B1) & (blocks - 1)) * benchIO
}

// BenchmarkSeqRead reads the working set in 1 MiB pieces one after the other (4 workers
// take the next piece): pread of the plain file against the chain's ReadAt, which makes one
// pread per extent of the merged view that the piece crosses (at depth 128 a 1 MiB piece of
// the fixture crosses about 200).
func BenchmarkSeqRead(b *testing.B) {
	bufs := sync.Pool{New: func() any { return new([mib]byte) }}
	seqOp := func(f io.ReaderAt) ioOp {
		var next atomic.Int64
		return func(_ *rand.Rand, _ []byte) error {
			buf := bufs.Get().(*[mib]byte)
			defer bufs.Put(buf)
			_, err := f.ReadAt(buf[:], (next.Add(1)-1)*mib%benchWorkSet)
			return err
		}
	}
	b.Run("plain", func(b *testing.B) {
		b.SetBytes(mib)
		benchRandIO(b, seqOp(chainFix.get(b).plain), nil)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d", d), func(b *testing.B) {
			fx := chainFix.get(b)
			c := fx.volume(b, fmt.Sprintf("read%d", d), d, nil)
			b.SetBytes(mib)
			benchRandIO(b, seqOp(c), seqOp(fx.plain))
		})
	}
}

// BenchmarkRandWrite writes 4 KiB at random aligned offsets with 4 goroutines. steady: the
// blocks are already written (plain file) or already held by the top (chain: the top was
// filled over the working set first), so no copy-up and no index change; the baseline of
// its x-plain is pwrite into the top's own file at the same kind of offsets, so that both
// sides write the same file with the same page cache state and the ratio is the engine's
// overhead alone (plain files that differ only in their history differ by 2x here). first: every write
// hits a block never written before (plain: a hole of a sparse file; chain: a block the top
// lacks, so the index changes), in a fresh 16 GiB file or clone (grown from 1 GiB) for each
// round.
func BenchmarkRandWrite(b *testing.B) {
	b.Run("plain/steady", func(b *testing.B) {
		benchRandIO(b, writeOp(chainFix.get(b).plain), nil)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d/steady", d), func(b *testing.B) {
			fx := chainFix.get(b)
			c := fx.volume(b, fmt.Sprintf("steady%d", d), d, func(c *cow.Chain) {
				// The same history as the plain file: written in 1 MiB pieces, then synced.
				fillFile(b, c, 0, benchWorkSet)
				if err := c.Flush(); err != nil {
					b.Fatal(err)
				}
			})
			benchRandIO(b, writeOp(c), writeOp(fx.topFile(b, fmt.Sprintf("steady%d", d))))
		})
	}
	// freshPlain makes a new sparse file for first writes, removed when b ends.
	round := 0
	freshPlain := func(b *testing.B) *os.File {
		round++
		path := filepath.Join(chainFix.get(b).dir, fmt.Sprintf("first-%d.raw", round))
		f := createSparse(b, path, benchFirstSize, 0)
		b.Cleanup(func() { f.Close(); os.Remove(path) })
		return f
	}
	b.Run("plain/first", func(b *testing.B) {
		benchRandIO(b, firstWriteOp(freshPlain(b)), nil)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d/first", d), func(b *testing.B) {
			fx := chainFix.get(b)
			round++
			name := fmt.Sprintf("first%d-%d", d, round)
			if err := fx.newVolume(name, d); err != nil {
				b.Fatal(err)
			}
			if err := fx.st.Resize(name, benchFirstSize); err != nil {
				b.Fatal(err)
			}
			c, err := fx.st.Open(name, cow.OpenOptions{})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() {
				if err := c.Close(); err != nil {
					b.Error(err)
				}
				if err := fx.st.DeleteVolume(name); err != nil {
					b.Error(err)
				}
			})
			benchRandIO(b, firstWriteOp(c), firstWriteOp(freshPlain(b)))
		})
	}
}

// BenchmarkSeqWrite writes 1 MiB pieces one after the other (4 workers take the next
// piece) into blocks never written before: a fresh 16 GiB sparse file against a fresh
// clone (grown to 16 GiB) at several depths, where each write replaces many index spans
// of the layers below. MiB/s and x-plain as for the random benchmarks.
func BenchmarkSeqWrite(b *testing.B) {
	b.Cleanup(chainFix.close) // the last user: give its memory back before the next benchmarks
	seqOp := func(f io.WriterAt) ioOp {
		var next atomic.Int64
		return func(_ *rand.Rand, _ []byte) error {
			off := (next.Add(1) - 1) * mib % benchFirstSize
			_, err := f.WriteAt(benchPattern, off)
			return err
		}
	}
	round := 0
	freshPlain := func(b *testing.B) *os.File {
		round++
		path := filepath.Join(chainFix.get(b).dir, fmt.Sprintf("seq-%d.raw", round))
		f := createSparse(b, path, benchFirstSize, 0)
		b.Cleanup(func() { f.Close(); os.Remove(path) })
		return f
	}
	b.Run("plain", func(b *testing.B) {
		b.SetBytes(mib)
		benchRandIO(b, seqOp(freshPlain(b)), nil)
	})
	for _, d := range benchDepths {
		b.Run(fmt.Sprintf("chain/depth=%d", d), func(b *testing.B) {
			fx := chainFix.get(b)
			round++
			name := fmt.Sprintf("seq%d-%d", d, round)
			if err := fx.newVolume(name, d); err != nil {
				b.Fatal(err)
			}
			if err := fx.st.Resize(name, benchFirstSize); err != nil {
				b.Fatal(err)
			}
			c, err := fx.st.Open(name, cow.OpenOptions{})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() {
				if err := c.Close(); err != nil {
					b.Error(err)
				}
				if err := fx.st.DeleteVolume(name); err != nil {
					b.Error(err)
				}
			})
			b.SetBytes(mib)
			benchRandIO(b, seqOp(c), seqOp(freshPlain(b)))
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
	dir := scatterRoot.sub(b, "million")
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
	st, err := cow.OpenStore(diskRoot.sub(b, "size"))
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

// touchOff is where the i-th fresh write of a snapshot or clone benchmark goes.
func touchOff(i int, size int64) int64 { return alignBlock(int64(i) * 7919 * benchIO % size) }

// touch writes one 4 KiB block into the top layer file of the closed volume v, unsynced, as
// a writer that just closed it would leave it: the snapshot or clone that follows must make
// it durable (and, for a clone, must freeze the top rather than share its parent).
func touch(b *testing.B, st *cow.Store, i int, size int64) {
	b.Helper()
	info, err := st.Info("v")
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(info.Layers[len(info.Layers)-1].Path, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(benchPattern[:benchIO], touchOff(i, size)); err != nil {
		b.Fatal(err)
	}
}

// openV opens volume v for a live benchmark, closed when b ends.
func openV(b *testing.B, st *cow.Store) *cow.Chain {
	b.Helper()
	c, err := st.Open("v", cow.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := c.Close(); err != nil {
			b.Error(err)
		}
	})
	return c
}

// BenchmarkSnapshot times taking a snapshot of a volume whose top holds a fresh unsynced
// write, at several virtual sizes: offline (Store.Snapshot, volume closed: sync the top,
// new top, manifest) and live (Chain.Snapshot on the open volume: quiesce, flush, freeze,
// new top). Snapshots pile up (a volume with many snapshots is normal), so the chain grows
// by one layer per iteration. Goal: < 50 ms, flat across sizes.
func BenchmarkSnapshot(b *testing.B) {
	for _, sz := range benchSizes {
		b.Run("size="+sz.name, func(b *testing.B) {
			st := sizeFixture(b, sz.size)
			round := 0
			b.Run("offline", func(b *testing.B) {
				round++
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					touch(b, st, i, sz.size)
					b.StartTimer()
					if err := st.Snapshot("v", fmt.Sprintf("off-%d-%d", round, i), nil); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("live", func(b *testing.B) {
				round++
				c := openV(b, st)
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					if _, err := c.WriteAt(benchPattern[:benchIO], touchOff(i, sz.size)); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := c.Snapshot(fmt.Sprintf("live-%d-%d", round, i), nil); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// BenchmarkClone times making a new volume over a snapshot (Store.Clone from a snapshot),
// over a closed volume whose top holds a fresh write (its top is frozen first), and over
// an open one (live freeze), at several virtual sizes. Clones pile up. Goal: < 50 ms, flat
// across sizes.
func BenchmarkClone(b *testing.B) {
	for _, sz := range benchSizes {
		b.Run("size="+sz.name, func(b *testing.B) {
			st := sizeFixture(b, sz.size)
			if err := st.Snapshot("v", "snap", nil); err != nil {
				b.Fatal(err)
			}
			round := 0
			b.Run("from=snapshot", func(b *testing.B) {
				round++
				for i := 0; i < b.N; i++ {
					if err := st.Clone("snap", fmt.Sprintf("s-%d-%d", round, i), nil); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("from=volume", func(b *testing.B) {
				round++
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					touch(b, st, i, sz.size)
					b.StartTimer()
					if err := st.Clone("v", fmt.Sprintf("v-%d-%d", round, i), nil); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("from=volume/live", func(b *testing.B) {
				round++
				c := openV(b, st)
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					if _, err := c.WriteAt(benchPattern[:benchIO], touchOff(i, sz.size)); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := st.Clone("v", fmt.Sprintf("l-%d-%d", round, i), nil); err != nil {
						b.Fatal(err)
					}
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
			dir := diskRoot.sub(b, "merge")
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
			if len(info.Layers) != 1 || info.Allocated < tc.data {
				b.Fatalf("after merge: %d layers, %d bytes allocated; want 1, at least %d", len(info.Layers), info.Allocated, tc.data)
			}
			b.ReportMetric(float64(tc.data)/mib/(b.Elapsed().Seconds()/float64(b.N)), "MiB/s")
		})
	}
}

// TestHotPathAllocs guards what ReadAt and WriteAt promise: no allocation on a read, nor on
// a write into blocks the top already holds (the benchmarks above show the same as
// allocs/op; this fails when it regresses).
func TestHotPathAllocs(t *testing.T) {
	dir := t.TempDir()
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "base.raw")
	content := make([]byte, 4*mib)
	copy(content[:2*mib], bytes.Repeat(benchPattern[:benchIO], 2*mib/benchIO))
	writeSparse(t, base, content)
	if err := st.Create("v", cow.CreateOptions{Base: base}); err != nil {
		t.Fatal(err)
	}
	c, err := st.Open("v", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, benchIO)
	for l := range 3 { // three frozen layers of scattered blocks, then a top holding a few
		for i := range 64 {
			if _, err := c.WriteAt(benchPattern[:benchIO], int64((i*37+l*11)%1024)*benchIO); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Snapshot(fmt.Sprintf("s%d", l), nil); err != nil {
			t.Fatal(err)
		}
	}
	held := int64(5 * benchIO)
	if _, err := c.WriteAt(buf, held); err != nil {
		t.Fatal(err)
	}
	var off int64
	read := testing.AllocsPerRun(1000, func() {
		off = (off + 7*benchIO) % (4 * mib)
		if _, err := c.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	})
	write := testing.AllocsPerRun(1000, func() {
		if _, err := c.WriteAt(buf, held); err != nil {
			t.Fatal(err)
		}
	})
	if read != 0 || write != 0 {
		t.Errorf("allocations per 4 KiB ReadAt: %v, per WriteAt into a held block: %v; want 0 and 0", read, write)
	}
}
