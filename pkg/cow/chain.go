package cow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// BlockSize is the engine's unit of presence and copy-up. Layer files live on file systems
// whose block size is at most this (checked at open), so a block-aligned write allocates
// exactly the blocks it covers and nothing around them.
const BlockSize = 4096

// stripeCount is the number of copy-up locks per chain; a write that changes which layer
// serves a block holds the lock of that block's stripe.
const stripeCount = 4096

// openLayer is one layer of an open chain.
type openLayer struct {
	id   string
	meta LayerMeta
	f    *os.File
	view layerView // reads once the layer no longer changes (not the top)
}

// Chain is an open volume or snapshot: the merged view of its layers, readable and (for a
// volume opened read-write) writable like a disk. All methods are safe for concurrent use.
type Chain struct {
	store    *Store
	name     string
	snapshot bool // a snapshot's chain: read-only, no top
	lockFile *os.File

	// io is held shared by every read and write and exclusively by what must see no I/O in
	// flight: discard (it punches holes), a flush that persists the zero list, snapshot,
	// resize, close. Quiescing a chain is taking io exclusively.
	io       sync.RWMutex
	resizeMu sync.Mutex // serializes Resize, which takes io only after the store's lock
	closed   bool
	size     int64
	layers   []*openLayer // bottom first; layers[top] is the writable top
	top      int          // -1 for a read-only chain
	// readOnly is top < 0, fixed at open: ReadOnly reads it without the locks that guard top,
	// which a live snapshot moves.
	readOnly bool

	idxMu sync.RWMutex // guards idx, zeroCand, unpunched, zeroDirty, topEmpty
	idx   *index
	// zeroCand holds every range that may be in the top's zero list: the persisted list and
	// the discards since. The list written at flush is the part the index still says is zero.
	zeroCand *rangeMap[bool]
	// unpunched holds discarded ranges over lower data whose hole is punched only at the next
	// flush, after the zero list that hides the lower data is durable.
	unpunched *rangeMap[bool]
	zeroDirty bool
	topEmpty  bool // the top holds no data and no zero list: a clone may skip freezing it

	stripes [stripeCount]sync.Mutex
}

// Name returns the volume or snapshot name the chain was opened by.
func (c *Chain) Name() string { return c.name }

// Size returns the virtual size in bytes.
func (c *Chain) Size() int64 {
	c.io.RLock()
	defer c.io.RUnlock()
	return c.size
}

// ReadOnly reports whether writes are refused.
func (c *Chain) ReadOnly() bool { return c.readOnly }

// Depth returns the number of layers, the base included.
func (c *Chain) Depth() int {
	c.io.RLock()
	defer c.io.RUnlock()
	return len(c.layers)
}

func (c *Chain) checkRange(off, n int64) error {
	if c.closed {
		return ErrClosed
	}
	if off < 0 || n < 0 || off+n > c.size || off+n < off {
		return fmt.Errorf("%w: [%d, +%d) on %s of %d bytes", ErrOutOfRange, off, n, c.name, c.size)
	}
	return nil
}

// ReadAt reads len(p) bytes at off from the merged view. A read that reaches past the end
// returns what fits and io.EOF.
//
// Hot path: takes only shared locks, allocates nothing, one walk of the index per readBatch
// extents crossed.
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	c.io.RLock()
	defer c.io.RUnlock()
	n, eof := c.clampRead(off, len(p))
	if eof != nil && eof != io.EOF {
		return 0, eof
	}
	if err := c.readLocked(p[:n], off, nil); err != nil {
		return 0, err
	}
	return n, eof
}

// maxViewPieces bounds the slices of one view: a reply is one writev, of at most 1024 vectors.
const maxViewPieces = 512

// ReadView is ReadAt without the copy, for a server that replies with a vectored write: it
// appends [off, off+len(buf)) of the merged view to view as slices in order, pieces of mapped
// layers in place and the rest read into buf. A read past the end returns what exists.
//
// On success the chain stays read-locked, so that no snapshot, resize or close can start,
// until EndView: the slices are valid until then, and EndView must follow every ReadView that
// returned no error.
func (c *Chain) ReadView(buf []byte, off int64, view [][]byte) ([][]byte, error) {
	c.io.RLock()
	n, err := c.clampRead(off, len(buf))
	if err == io.EOF {
		err = nil
	}
	if err == nil {
		err = c.readLocked(buf[:n], off, &view)
	}
	if err != nil {
		c.io.RUnlock()
		return nil, err
	}
	return view, nil
}

// EndView releases the chain after ReadView.
func (c *Chain) EndView() { c.io.RUnlock() }

// clampRead returns how much of a read of n bytes at off the chain holds, and io.EOF when that
// is less than n.
func (c *Chain) clampRead(off int64, n int) (int, error) {
	switch {
	case c.closed:
		return 0, ErrClosed
	case off < 0:
		return 0, fmt.Errorf("%w: negative offset %d", ErrOutOfRange, off)
	case off >= c.size:
		return 0, io.EOF
	case int64(n) > c.size-off:
		return int(c.size - off), io.EOF
	}
	return n, nil
}

// piece is a run of the merged view up to end: served by st.cur, or a gap (ok false).
type piece struct {
	end int64
	st  state
	ok  bool
}

// readBatch bounds the pieces that one hold of the index lock collects for a read: a 1 MiB
// read of a deep chain crosses a few hundred, and a writer waits for no more than one batch.
const readBatch = 64

// lookupPieces appends to into, up to its capacity, the pieces of [off, end) in order, in
// one walk of the index rather than one search per piece.
func (c *Chain) lookupPieces(off, end int64, into []piece) []piece {
	c.idxMu.RLock()
	defer c.idxMu.RUnlock()
	c.idx.each(off, end, func(_, e int64, st state, ok bool) bool {
		into = append(into, piece{end: e, st: st, ok: ok})
		return len(into) < cap(into)
	})
	return into
}

// readLocked reads [off, off+len(p)) into p. With view, pieces that a mapped layer serves are
// appended to *view in place instead, and the rest of p in runs between them.
func (c *Chain) readLocked(p []byte, off int64, view *[][]byte) error {
	var batch [readBatch]piece
	run := 0 // start in p of what is read into p and not yet in *view
	for at := 0; at < len(p); {
		for _, pc := range c.lookupPieces(off, off+int64(len(p)-at), batch[:0]) {
			n := int(pc.end - off)
			if !pc.ok || !pc.st.cur.hasData() {
				clear(p[at : at+n])
			} else if mem := c.mapped(pc.st.cur.layer(), off, n); view != nil && mem != nil && len(*view) < maxViewPieces-2 {
				if run < at {
					*view = append(*view, p[run:at])
				}
				*view = append(*view, mem)
				run = at + n
			} else if err := c.readLayer(pc.st.cur.layer(), mem, p[at:at+n], off); err != nil {
				return err
			}
			at, off = at+n, pc.end
		}
	}
	if view != nil && run < len(p) {
		*view = append(*view, p[run:])
	}
	return nil
}

// mapped returns layer i's bytes [off, off+n) in place, or nil when they are read with pread:
// from the writable top, from a file that is not mapped, and in pieces over mapReadMax of a
// store layer (whose mapping does no read-around; pread's readahead serves those better cold).
func (c *Chain) mapped(i int, off int64, n int) []byte {
	l := c.layers[i]
	sparse := l.meta.State != Base
	if i == c.top || sparse && n > mapReadMax {
		return nil
	}
	if mem := l.view.get(l.f, sparse); off+int64(n) <= int64(len(mem)) {
		return mem[off : off+int64(n)]
	}
	return nil
}

// readLayer reads p at off from layer i: a copy of mem, its mapped bytes, when there are.
func (c *Chain) readLayer(i int, mem, p []byte, off int64) error {
	if mem != nil {
		return copyMapped(p, mem, c.layers[i].f.Name(), off)
	}
	return preadFull(c.layers[i].f, p, off)
}

// preadFull reads len(p) bytes at off; what lies past the end of the file reads as zero
// (a base image need not be a multiple of the block size).
func preadFull(f *os.File, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := f.ReadAt(p, off)
		if n == len(p) {
			return nil
		}
		if err == io.EOF {
			clear(p[n:])
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s at %d: %w", f.Name(), off+int64(n), err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func pwriteFull(f *os.File, p []byte, off int64) error {
	if _, err := f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write %s at %d: %w", f.Name(), off, err)
	}
	return nil
}

// WriteAt writes p at off into the top layer. A write that covers part of a block the top
// does not hold yet first copies the rest of that block up from below.
//
// Hot path: a write into blocks the top already holds takes only shared locks and makes no
// change to the index; it allocates nothing.
func (c *Chain) WriteAt(p []byte, off int64) (int, error) {
	c.io.RLock()
	defer c.io.RUnlock()
	if c.top < 0 {
		return 0, fmt.Errorf("write %s: %w", c.name, ErrReadOnly)
	}
	if err := c.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := c.writeLocked(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// topHolds reports whether the top holds data over all of [start, end).
func (c *Chain) topHolds(start, end int64) bool {
	c.idxMu.RLock()
	defer c.idxMu.RUnlock()
	for start < end {
		e, st, ok := c.idx.lookup(start, end)
		if !ok || st.cur != dataOwner(c.top) {
			return false
		}
		start = e
	}
	return true
}

// writeLocked is WriteAt with c.io held (shared or exclusive).
func (c *Chain) writeLocked(p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	top := c.layers[c.top].f
	end := off + int64(len(p))
	first, last := alignDown(off), alignUp(end)
	if c.topHolds(first, last) {
		return pwriteFull(top, p, off)
	}
	c.lockStripes(first/BlockSize, last/BlockSize)
	defer c.unlockStripes(first/BlockSize, last/BlockSize)
	lo, hi := off, end
	if lo != first { // head: part of a block
		n := min(hi, first+BlockSize) - lo
		if err := c.writePartial(p[:n], lo); err != nil {
			return err
		}
		p, lo = p[n:], lo+n
	}
	if lo < hi && hi%BlockSize != 0 { // tail: part of a block
		tb := alignDown(hi)
		if err := c.writePartial(p[tb-lo:], tb); err != nil {
			return err
		}
		p, hi = p[:tb-lo], tb
	}
	if lo < hi {
		if err := pwriteFull(top, p, lo); err != nil {
			return err
		}
	}
	c.markTopData(first, last)
	return nil
}

// writePartial writes p, which lies inside one block, at off. The caller holds the block's
// stripe. If the top lacks the block, the block is assembled from the view below and
// written whole, so the top never holds a block with bytes nobody wrote.
func (c *Chain) writePartial(p []byte, off int64) error {
	blk := alignDown(off)
	if c.topHolds(blk, blk+BlockSize) {
		return pwriteFull(c.layers[c.top].f, p, off)
	}
	buf := blockPool.Get().(*[BlockSize]byte)
	defer blockPool.Put(buf)
	if err := c.readLocked(buf[:], blk, nil); err != nil {
		return err
	}
	copy(buf[off-blk:], p)
	return pwriteFull(c.layers[c.top].f, buf[:], blk)
}

var blockPool = sync.Pool{New: func() any { return new([BlockSize]byte) }}

// markTopData records that the top now holds [start, end).
func (c *Chain) markTopData(start, end int64) {
	top := c.top
	c.idxMu.Lock()
	defer c.idxMu.Unlock()
	c.topEmpty = false
	c.idx.update(start, end, func(st state, ok bool) (state, bool) {
		if ok && st.cur == dataOwner(top) {
			return st, true
		}
		return state{cur: dataOwner(top), below: lowerOf(st, ok, top)}, true
	})
}

// lockStripes locks the stripes of blocks [b0, b1) in ascending stripe order, so two
// writers never wait on each other crosswise.
func (c *Chain) lockStripes(b0, b1 int64) {
	c.eachStripe(b0, b1, func(m *sync.Mutex) { m.Lock() })
}

func (c *Chain) unlockStripes(b0, b1 int64) {
	c.eachStripe(b0, b1, func(m *sync.Mutex) { m.Unlock() })
}

func (c *Chain) eachStripe(b0, b1 int64, fn func(*sync.Mutex)) {
	n := b1 - b0
	if n >= stripeCount {
		for i := range c.stripes {
			fn(&c.stripes[i])
		}
		return
	}
	s0 := int(b0 % stripeCount)
	if s0+int(n) <= stripeCount {
		for i := s0; i < s0+int(n); i++ {
			fn(&c.stripes[i])
		}
		return
	}
	for i := 0; i < s0+int(n)-stripeCount; i++ {
		fn(&c.stripes[i])
	}
	for i := s0; i < stripeCount; i++ {
		fn(&c.stripes[i])
	}
}

func alignDown(off int64) int64 { return off &^ (BlockSize - 1) }
func alignUp(off int64) int64   { return (off + BlockSize - 1) &^ (BlockSize - 1) }

// Discard makes [off, off+n) read zero and frees the top's space there. It never exposes
// lower layers: where a lower layer holds data, the range goes into the top's zero list.
// Parts of blocks at either end are written with zeros instead.
func (c *Chain) Discard(off, n int64) error {
	c.io.Lock()
	defer c.io.Unlock()
	if c.top < 0 {
		return fmt.Errorf("discard %s: %w", c.name, ErrReadOnly)
	}
	if err := c.checkRange(off, n); err != nil {
		return err
	}
	end := off + n
	first, last := alignUp(off), alignDown(end)
	if first >= last { // inside one block, or across the boundary of two
		return c.writeZeros(off, end)
	}
	if err := c.writeZeros(off, first); err != nil {
		return err
	}
	if err := c.writeZeros(last, end); err != nil {
		return err
	}
	return c.discardBlocks(first, last)
}

// WriteZeroes makes [off, off+n) read zero. Layers are sparse files, so this is Discard:
// the engine never allocates zeroed space in a layer (DESIGN §2).
func (c *Chain) WriteZeroes(off, n int64) error { return c.Discard(off, n) }

func (c *Chain) writeZeros(start, end int64) error {
	if start >= end {
		return nil
	}
	buf := blockPool.Get().(*[BlockSize]byte)
	defer blockPool.Put(buf)
	clear(buf[:])
	for start < end {
		n := min(end-start, BlockSize-start%BlockSize)
		if err := c.writeLocked(buf[:n], start); err != nil {
			return err
		}
		start += n
	}
	return nil
}

// discardBlocks handles the block-aligned [start, end) with c.io held exclusively.
func (c *Chain) discardBlocks(start, end int64) error {
	top := c.top
	var punchNow []Extent
	c.idxMu.Lock()
	c.topEmpty = false
	c.idx.update(start, end, func(st state, ok bool) (state, bool) {
		low := lowerOf(st, ok, top)
		if low.hasData() {
			// Hide the lower data; the top's copy is punched once the zero list is durable.
			return state{cur: zeroOwner(top), below: low}, true
		}
		return state{cur: low, below: low}, low != none
	})
	// Which parts to punch now: those where nothing below holds data.
	c.idx.each(start, end, func(s, e int64, st state, ok bool) bool {
		if !ok || st.cur != zeroOwner(top) {
			punchNow = appendExtent(punchNow, s, e)
		} else {
			c.zeroCand.set(s, e, true)
			c.unpunched.set(s, e, true)
			c.zeroDirty = true
		}
		return true
	})
	c.idxMu.Unlock()
	for _, e := range punchNow {
		if err := punchHole(c.layers[top].f, e.Off, e.Len); err != nil {
			return err
		}
	}
	return nil
}

// appendExtent appends [s, e), merging it into the last extent when they touch.
func appendExtent(list []Extent, s, e int64) []Extent {
	if n := len(list); n > 0 && list[n-1].End() == s {
		list[n-1].Len += e - s
		return list
	}
	return append(list, Extent{Off: s, Len: e - s})
}

// Flush makes every write and discard completed before it durable: the zero list first
// (when it changed), then the holes it covers, then one fdatasync of the top.
func (c *Chain) Flush() error {
	c.idxMu.RLock()
	dirty := c.zeroDirty
	c.idxMu.RUnlock()
	if dirty {
		c.io.Lock()
		defer c.io.Unlock()
		return c.flushLocked()
	}
	c.io.RLock()
	defer c.io.RUnlock()
	if c.closed {
		return ErrClosed
	}
	if c.top < 0 {
		return nil
	}
	return fdatasync(c.layers[c.top].f)
}

// flushLocked is Flush with c.io held exclusively.
func (c *Chain) flushLocked() error {
	if c.closed {
		return ErrClosed
	}
	if c.top < 0 {
		return nil
	}
	top := c.layers[c.top]
	if c.zeroDirty {
		list := c.topZeroWithin(c.zeroCand)
		if err := writeZeroList(c.store.zeroPath(top.id), list); err != nil {
			return fmt.Errorf("flush %s: %w", c.name, err)
		}
		punch := c.topZeroWithin(c.unpunched)
		for _, e := range punch {
			if err := punchHole(top.f, e.Off, e.Len); err != nil {
				return fmt.Errorf("flush %s: %w", c.name, err)
			}
		}
		// Flush reads zeroDirty under idxMu alone, without c.io: write it under idxMu.
		c.idxMu.Lock()
		c.zeroCand = newRangeMap[bool]()
		for _, e := range list {
			c.zeroCand.set(e.Off, e.End(), true)
		}
		c.unpunched = newRangeMap[bool]()
		c.zeroDirty = false
		c.idxMu.Unlock()
	}
	return fdatasync(top.f)
}

// topZeroWithin returns the parts of the ranges in set that the index says the top's zero
// list covers. c.idxMu or c.io exclusively is held.
func (c *Chain) topZeroWithin(set *rangeMap[bool]) []Extent {
	var out []Extent
	set.each(0, c.size, func(s, e int64, _ bool, ok bool) bool {
		if ok {
			c.idx.each(s, e, func(s, e int64, st state, ok bool) bool {
				if ok && st.cur == zeroOwner(c.top) {
					out = appendExtent(out, s, e)
				}
				return true
			})
		}
		return true
	})
	return out
}

func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("fdatasync %s: %w", f.Name(), err)
		}
		return nil
	}
}

// Close flushes a writable chain and releases its files and its lock.
func (c *Chain) Close() error {
	c.io.Lock()
	defer c.io.Unlock()
	if c.closed {
		return nil
	}
	err := c.flushLocked()
	c.closed = true
	for _, l := range c.layers {
		if l != nil {
			err = errors.Join(err, l.view.close(), l.f.Close())
		}
	}
	if c.lockFile != nil {
		err = errors.Join(err, c.lockFile.Close())
	}
	c.store.forget(c)
	return err
}
