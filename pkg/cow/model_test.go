package cow_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// byteSource feeds the model: random bytes for the long tests, the fuzzer's input for
// FuzzModel. done reports that a fuzz input is used up.
type byteSource interface {
	next() byte
	done() bool
}

type randSource struct{ r *rand.Rand }

func (s randSource) next() byte { return byte(s.r.Uint32()) }
func (s randSource) done() bool { return false }

type fuzzSource struct {
	data []byte
	pos  int
}

func (s *fuzzSource) next() byte {
	if s.pos >= len(s.data) {
		return 0
	}
	s.pos++
	return s.data[s.pos-1]
}
func (s *fuzzSource) done() bool { return s.pos >= len(s.data) }

func (m *modelRun) u16() int { return int(m.src.next())<<8 | int(m.src.next()) }
func (m *modelRun) pick(n int) int {
	if n <= 1 {
		return 0
	}
	return m.u16() % n
}

// modelRun drives a store and a flat in-memory reference side by side: every volume and
// snapshot is a []byte in the model, and every read of the engine must match it exactly.
type modelRun struct {
	t     testing.TB
	src   byteSource
	store *cow.Store
	dir   string
	vols  map[string][]byte
	snaps map[string][]byte
	open  map[string]*cow.Chain
	base  string // path of the base file
	baseC []byte
	seq   int
	ops   map[string]int
}

const maxVolumes, maxSnapshots = 5, 8

func newModelRun(t testing.TB, dir string, src byteSource) *modelRun {
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	m := &modelRun{t: t, src: src, store: st, dir: dir, vols: map[string][]byte{}, snaps: map[string][]byte{},
		open: map[string]*cow.Chain{}, ops: map[string]int{}}
	// A base whose size is not a multiple of the block size, with data and holes.
	m.base = filepath.Join(dir, "base.raw")
	m.baseC = make([]byte, 23*cow.BlockSize+1234)
	f, err := os.Create(m.base)
	if err != nil {
		t.Fatal(err)
	}
	for blk := 0; blk*cow.BlockSize < len(m.baseC); blk += 2 {
		end := min(len(m.baseC), (blk+1)*cow.BlockSize)
		for i := blk * cow.BlockSize; i < end; i++ {
			m.baseC[i] = byte(i*7+blk) | 1
		}
		if _, err := f.WriteAt(m.baseC[blk*cow.BlockSize:end], int64(blk*cow.BlockSize)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(int64(len(m.baseC))); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return m
}

// trace logs an operation when COW_MODEL_TRACE is set, to replay a failure by hand.
func (m *modelRun) trace(format string, args ...any) {
	if os.Getenv("COW_MODEL_TRACE") != "" {
		m.t.Logf(format, args...)
	}
}

func (m *modelRun) close() {
	for name, c := range m.open {
		if err := c.Close(); err != nil {
			m.t.Errorf("close %s: %v", name, err)
		}
		delete(m.open, name)
	}
}

func (m *modelRun) name(prefix string) string {
	m.seq++
	return fmt.Sprintf("%s-%d", prefix, m.seq)
}

func (m *modelRun) anyName(set map[string][]byte) string {
	if len(set) == 0 {
		return ""
	}
	names := make([]string, 0, len(set))
	for n := range set {
		names = append(names, n)
	}
	sort.Strings(names)
	return names[m.pick(len(names))]
}

// chain returns the open chain of a volume, opening it if needed.
func (m *modelRun) chain(name string) *cow.Chain {
	if c := m.open[name]; c != nil {
		return c
	}
	c, err := m.store.Open(name, cow.OpenOptions{})
	if err != nil {
		m.t.Fatalf("open %s: %v", name, err)
	}
	m.open[name] = c
	return c
}

func (m *modelRun) closeVolume(name string) {
	if c := m.open[name]; c != nil {
		if err := c.Close(); err != nil {
			m.t.Fatalf("close %s: %v", name, err)
		}
		delete(m.open, name)
	}
}

// rangeIn picks an offset and a length inside size, often unaligned, sometimes large.
func (m *modelRun) rangeIn(size int) (int, int) {
	var off, n int
	switch m.pick(4) {
	case 0: // aligned blocks
		blocks := size / cow.BlockSize
		off = m.pick(blocks) * cow.BlockSize
		n = (1 + m.pick(4)) * cow.BlockSize
	case 1: // inside one block
		off = m.pick(size)
		n = 1 + m.pick(cow.BlockSize)
	case 2: // across block boundaries
		off = m.pick(size)
		n = 1 + m.pick(3*cow.BlockSize)
	default: // large
		off = m.pick(size)
		n = 1 + m.pick(size)
	}
	return off, min(n, size-off)
}

func (m *modelRun) step() {
	if len(m.vols) == 0 {
		m.create()
		return
	}
	switch op := m.pick(100); {
	case op < 35:
		m.write()
	case op < 45:
		m.discard()
	case op < 60:
		m.read()
	case op < 64:
		m.flush()
	case op < 70:
		m.snapshot()
	case op < 75:
		m.clone()
	case op < 79:
		m.deleteSnapshot()
	case op < 82:
		m.deleteVolume()
	case op < 85:
		m.create()
	case op < 88:
		m.resize()
	case op < 93:
		name := m.anyName(m.vols)
		m.ops["reopen"]++
		m.trace("close %s", name)
		m.closeVolume(name)
	case op < 94:
		m.export()
	case op < 96:
		m.snapshotGroup()
	case op < 97:
		m.compose()
	case op < 98:
		m.heldSnapshot()
	default:
		m.verifyOne()
	}
}

func (m *modelRun) create() {
	if len(m.vols) >= maxVolumes {
		return
	}
	name := m.name("vol")
	opts := cow.CreateOptions{Size: int64((8 + m.pick(40)) * cow.BlockSize)}
	content := make([]byte, opts.Size)
	if m.pick(2) == 0 {
		opts.Base = m.base
		opts.Size = max(opts.Size, int64(len(m.baseC)))
		content = make([]byte, (opts.Size+cow.BlockSize-1)/cow.BlockSize*cow.BlockSize)
		copy(content, m.baseC)
	}
	if err := m.store.Create(name, opts); err != nil {
		m.t.Fatalf("create %s: %v", name, err)
	}
	m.ops["create"]++
	m.trace("create %s size %d base %v", name, opts.Size, opts.Base != "")
	m.vols[name] = content
}

func (m *modelRun) write() {
	name := m.anyName(m.vols)
	content := m.vols[name]
	off, n := m.rangeIn(len(content))
	p := make([]byte, n)
	seed := m.src.next()
	for i := range p {
		p[i] = seed + byte(i*31+off)
	}
	if _, err := m.chain(name).WriteAt(p, int64(off)); err != nil {
		m.t.Fatalf("write %s [%d,+%d): %v", name, off, n, err)
	}
	m.ops["write"]++
	m.trace("write %s [%d,+%d)", name, off, n)
	copy(content[off:], p)
}

func (m *modelRun) discard() {
	name := m.anyName(m.vols)
	content := m.vols[name]
	off, n := m.rangeIn(len(content))
	c := m.chain(name)
	var err error
	if m.pick(2) == 0 {
		err = c.Discard(int64(off), int64(n))
	} else {
		err = c.WriteZeroes(int64(off), int64(n))
	}
	if err != nil {
		m.t.Fatalf("discard %s [%d,+%d): %v", name, off, n, err)
	}
	m.ops["discard"]++
	m.trace("discard %s [%d,+%d)", name, off, n)
	clear(content[off : off+n])
}

func (m *modelRun) read() {
	name := m.anyName(m.vols)
	content := m.vols[name]
	off, n := m.rangeIn(len(content))
	p := make([]byte, n)
	if _, err := m.chain(name).ReadAt(p, int64(off)); err != nil {
		m.t.Fatalf("read %s [%d,+%d): %v", name, off, n, err)
	}
	m.ops["read"]++
	m.compare(name, p, content[off:off+n], off)
}

func (m *modelRun) compare(name string, got, want []byte, off int) {
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		m.t.Fatalf("%s differs from the model at offset %d (got %#x, want %#x); ops so far %v", name, off+i, got[i], want[i], m.ops)
	}
}

func (m *modelRun) flush() {
	name := m.anyName(m.vols)
	if err := m.chain(name).Flush(); err != nil {
		m.t.Fatalf("flush %s: %v", name, err)
	}
	m.ops["flush"]++
	m.trace("flush %s", name)
}

func (m *modelRun) snapshot() {
	if len(m.snaps) >= maxSnapshots {
		return
	}
	vol := m.anyName(m.vols)
	snap := m.name("snap")
	var err error
	if c := m.open[vol]; c != nil && m.pick(2) == 0 {
		err = c.Snapshot(snap, nil)
	} else {
		err = m.store.Snapshot(vol, snap, nil) // routed to the open chain if there is one
	}
	if err != nil {
		m.t.Fatalf("snapshot %s of %s: %v", snap, vol, err)
	}
	m.ops["snapshot"]++
	m.trace("snapshot %s of %s", snap, vol)
	m.snaps[snap] = bytes.Clone(m.vols[vol])
}

// snapshotGroup snapshots two volumes at one point in time; with a taken name, none.
func (m *modelRun) snapshotGroup() {
	if len(m.vols) < 2 || len(m.snaps)+2 > maxSnapshots {
		return
	}
	a, b := m.anyName(m.vols), m.anyName(m.vols)
	if a == b {
		return
	}
	sa, sb := m.name("gsnap"), m.name("gsnap")
	if m.pick(4) == 0 && len(m.snaps) > 0 { // a taken name: the whole group must fail
		sb = m.anyName(m.snaps)
		if err := m.store.SnapshotGroup([]string{a, b}, []string{sa, sb}, nil); !errors.Is(err, cow.ErrExists) {
			m.t.Fatalf("group snapshot with a taken name: %v, want ErrExists", err)
		}
		if _, err := m.store.Info(sa); !errors.Is(err, cow.ErrNotFound) {
			m.t.Fatalf("a failed group snapshot left %s: %v", sa, err)
		}
		return
	}
	if err := m.store.SnapshotGroup([]string{a, b}, []string{sa, sb}, nil); err != nil {
		m.t.Fatalf("group snapshot of %s, %s: %v", a, b, err)
	}
	m.ops["snapshotGroup"]++
	m.trace("group snapshot %s of %s, %s of %s", sa, a, sb, b)
	m.snaps[sa], m.snaps[sb] = bytes.Clone(m.vols[a]), bytes.Clone(m.vols[b])
}

// compose makes a volume's top hold its whole view (the composed path's format).
func (m *modelRun) compose() {
	name := m.anyName(m.vols)
	m.closeVolume(name)
	if err := m.store.Compose(name); err != nil {
		m.t.Fatalf("compose %s: %v", name, err)
	}
	m.ops["compose"]++
	m.trace("compose %s", name)
}

// heldSnapshot snapshots and clones a composed volume held as an attached file would be:
// the top stays the top and a clone of it becomes the snapshot.
func (m *modelRun) heldSnapshot() {
	if len(m.snaps) >= maxSnapshots || len(m.vols) >= maxVolumes {
		return
	}
	name := m.anyName(m.vols)
	m.closeVolume(name)
	release, err := m.store.Hold(name)
	if err != nil {
		m.t.Fatalf("hold %s: %v", name, err)
	}
	defer release()
	if err := m.store.Compose(name); err != nil {
		m.t.Fatalf("compose held %s: %v", name, err)
	}
	top, _, err := m.store.TopPath(name)
	if err != nil {
		m.t.Fatal(err)
	}
	snap, clone := m.name("hsnap"), m.name("hclone")
	if err := m.store.Snapshot(name, snap, nil); err != nil {
		m.t.Fatalf("snapshot of held %s: %v", name, err)
	}
	if err := m.store.Clone(name, clone, nil); err != nil {
		m.t.Fatalf("clone of held %s: %v", name, err)
	}
	if after, _, _ := m.store.TopPath(name); after != top {
		m.t.Fatalf("snapshot of held %s moved its top from %s to %s", name, top, after)
	}
	m.ops["heldSnapshot"]++
	m.trace("held snapshot %s and clone %s of %s", snap, clone, name)
	m.snaps[snap] = bytes.Clone(m.vols[name])
	m.vols[clone] = bytes.Clone(m.vols[name])
}

func (m *modelRun) clone() {
	if len(m.vols) >= maxVolumes {
		return
	}
	var src string
	var content []byte
	if len(m.snaps) > 0 && m.pick(2) == 0 {
		src = m.anyName(m.snaps)
		content = m.snaps[src]
	} else {
		src = m.anyName(m.vols)
		content = m.vols[src]
	}
	name := m.name("clone")
	if err := m.store.Clone(src, name, nil); err != nil {
		m.t.Fatalf("clone %s from %s: %v", name, src, err)
	}
	m.ops["clone"]++
	m.trace("clone %s from %s", name, src)
	m.vols[name] = bytes.Clone(content)
}

func (m *modelRun) deleteSnapshot() {
	snap := m.anyName(m.snaps)
	if snap == "" {
		return
	}
	if err := m.store.DeleteSnapshot(snap); err != nil {
		m.t.Fatalf("delete snapshot %s: %v", snap, err)
	}
	m.ops["deleteSnapshot"]++
	m.trace("delete snapshot %s", snap)
	delete(m.snaps, snap)
}

func (m *modelRun) deleteVolume() {
	if len(m.vols) <= 1 {
		return
	}
	name := m.anyName(m.vols)
	if c := m.open[name]; c != nil {
		if err := m.store.DeleteVolume(name); !errors.Is(err, cow.ErrBusy) {
			m.t.Fatalf("delete of open volume %s: got %v, want ErrBusy", name, err)
		}
		m.closeVolume(name)
	}
	if err := m.store.DeleteVolume(name); err != nil {
		m.t.Fatalf("delete volume %s: %v", name, err)
	}
	m.ops["deleteVolume"]++
	m.trace("delete volume %s", name)
	delete(m.vols, name)
}

func (m *modelRun) resize() {
	name := m.anyName(m.vols)
	content := m.vols[name]
	grow := (1 + m.pick(8)) * cow.BlockSize
	var err error
	if c := m.open[name]; c != nil && m.pick(2) == 0 {
		err = c.Resize(int64(len(content) + grow))
	} else {
		err = m.store.Resize(name, int64(len(content)+grow))
	}
	if err != nil {
		m.t.Fatalf("resize %s: %v", name, err)
	}
	if err := m.store.Resize(name, int64(len(content)-cow.BlockSize)); !errors.Is(err, cow.ErrShrink) {
		m.t.Fatalf("shrinking %s: got %v, want ErrShrink", name, err)
	}
	m.ops["resize"]++
	m.trace("resize %s +%d", name, grow)
	m.vols[name] = append(content, make([]byte, grow)...)
}

func (m *modelRun) export() {
	var name string
	var want []byte
	if len(m.snaps) > 0 && m.pick(2) == 0 {
		name = m.anyName(m.snaps)
		want = m.snaps[name]
	} else {
		name = m.anyName(m.vols)
		want = m.vols[name]
		m.closeVolume(name) // a volume is exported when nobody writes it
	}
	dst := filepath.Join(m.dir, m.name("export"))
	if err := m.store.Export(name, dst, nil); err != nil {
		m.t.Fatalf("export %s: %v", name, err)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		m.t.Fatal(err)
	}
	os.Remove(dst)
	m.ops["export"]++
	if len(got) != len(want) {
		m.t.Fatalf("export of %s has %d bytes, want %d", name, len(got), len(want))
	}
	m.compare("export of "+name, got, want, 0)
}

// verifyOne reads a whole volume or snapshot and compares it with the model.
func (m *modelRun) verifyOne() {
	if len(m.snaps) > 0 && m.pick(2) == 0 {
		m.verifySnapshot(m.anyName(m.snaps))
		return
	}
	name := m.anyName(m.vols)
	c := m.chain(name)
	m.verifyChain(name, c, m.vols[name])
}

func (m *modelRun) verifySnapshot(name string) {
	c, err := m.store.OpenSnapshot(name)
	if err != nil {
		m.t.Fatalf("open snapshot %s: %v", name, err)
	}
	defer c.Close()
	m.verifyChain(name, c, m.snaps[name])
}

func (m *modelRun) verifyChain(name string, c *cow.Chain, want []byte) {
	m.ops["verify"]++
	if c.Size() != int64(len(want)) {
		m.t.Fatalf("%s has size %d, model %d", name, c.Size(), len(want))
	}
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil {
		m.t.Fatalf("read %s: %v", name, err)
	}
	m.compare(name, got, want, 0)
}

// verifyAll closes everything, checks the store and compares every volume and snapshot.
func (m *modelRun) verifyAll() {
	m.close()
	probs, err := m.store.Check(false)
	if err != nil || len(probs) > 0 {
		m.t.Fatalf("check: %v %v", err, probs)
	}
	for name := range m.snaps {
		m.verifySnapshot(name)
	}
	for name, want := range m.vols {
		m.verifyChain(name, m.chain(name), want)
	}
	m.close()
}

func (m *modelRun) run(n int) {
	for i := 0; i < n && !m.src.done(); i++ {
		m.step()
	}
	m.verifyAll()
}

// memDir returns a temporary directory on tmpfs where there is one: the long model runs
// and the fuzzer are about the engine's logic, and fsync there costs nothing.
// TestModelOnFileSystems runs the model on ext4, xfs and btrfs.
func memDir(t testing.TB) string {
	dir, err := os.MkdirTemp("/dev/shm", "cow-model-")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// modelOps is how many operations the long model test runs; CI runs it whole.
func modelOps(t *testing.T) int {
	if testing.Short() {
		return 20000
	}
	return 200000
}

func TestModel(t *testing.T) {
	seed := uint64(1)
	if s := os.Getenv("COW_MODEL_SEED"); s != "" {
		fmt.Sscan(s, &seed)
	}
	t.Logf("seed %d (COW_MODEL_SEED reruns it)", seed)
	m := newModelRun(t, memDir(t), randSource{rand.New(rand.NewPCG(seed, seed))})
	defer m.close()
	m.run(modelOps(t))
	t.Logf("operations: %v", m.ops)
}

func FuzzModel(f *testing.F) {
	for i := uint64(0); i < 8; i++ {
		r := rand.New(rand.NewPCG(i, 99))
		seed := make([]byte, 512)
		for j := range seed {
			seed[j] = byte(r.Uint32())
		}
		f.Add(seed)
	}
	f.Add(binary.BigEndian.AppendUint64(nil, 0xdeadbeef))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Long inputs only repeat what short ones find, at seconds each: keep the fuzzer fast.
		data = data[:min(len(data), 4096)]
		m := newModelRun(t, memDir(t), &fuzzSource{data: data})
		defer m.close()
		m.run(1 << 30)
	})
}
