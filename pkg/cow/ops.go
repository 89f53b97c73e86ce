package cow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

// openVolume returns the chain of a volume open read-write in this process, if any.
func (s *Store) openVolume(name string) *Chain {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open[name]
}

// withVolume runs fn on volume name's chain: through its Chain when this process has it
// open (the chain quiesces its own I/O), else under the volume's lock. A volume open in
// another process is refused with ErrBusy: nothing changes a chain behind its server's back.
func (s *Store) withVolume(name string, live func(c *Chain) error, offline func() error) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if c := s.openVolume(name); c != nil {
		return live(c)
	}
	if err := s.mustBeVolume(name); err != nil {
		return err
	}
	if s.locksVolume(name) {
		return offline()
	}
	lk, err := s.lockVolume(name, unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer lk.Close()
	return offline()
}

// mustBeVolume fails with ErrNotFound unless name is a volume: no lock file is ever made for
// a name that is not one.
func (s *Store) mustBeVolume(name string) error {
	m, release, err := s.read()
	if err != nil {
		return err
	}
	defer release()
	if m.Volumes[name] != nil {
		return nil
	}
	if m.Snapshots[name] != nil {
		return fmt.Errorf("volume %s: %w (%s is a snapshot)", name, ErrNotFound, name)
	}
	return fmt.Errorf("volume %s: %w", name, ErrNotFound)
}

// Snapshot freezes the current top of volume as snapshot snap and gives the volume a new
// empty top. It copies nothing: O(1) whatever the volume's size.
func (s *Store) Snapshot(volume, snap string, labels map[string]string) error {
	if err := ValidateName(snap); err != nil {
		return err
	}
	return s.withVolume(volume,
		func(c *Chain) error { return c.Snapshot(snap, labels) },
		func() error {
			return s.tx(func(m *manifest) error {
				_, err := s.freezeTop(m, volume, snap, labels, true)
				return err
			})
		})
}

// freezeTop freezes volume's top and gives it a new one. With snap empty the frozen layer
// stays unnamed (a clone's base). sync makes the old top durable first; a live chain has
// flushed it already. It returns the frozen layer's id.
func (s *Store) freezeTop(m *manifest, volume, snap string, labels map[string]string, sync bool) (string, error) {
	v := m.Volumes[volume]
	if v == nil {
		return "", fmt.Errorf("volume %s: %w", volume, ErrNotFound)
	}
	if snap != "" {
		if err := nameFree(m, snap); err != nil {
			return "", err
		}
	}
	old := m.Layers[v.Top]
	if old == nil || old.State != Active {
		return "", fmt.Errorf("%w: volume %s has no active top", ErrCorrupt, volume)
	}
	// A frozen layer must have its manifest size, but a grow is committed before the top
	// file follows (resizeTop): finish one that a crash cut short. A held top too: its
	// snapshot is a clone of the file as it is.
	if err := finishGrow(s.layerPath(v.Top), old.Size); err != nil {
		return "", err
	}
	if s.isHeld(volume) { // its top is attached as a file: it must stay the top
		return s.snapshotOpaqueTop(m, volume, snap, labels)
	}
	if sync {
		if err := syncFile(s.layerPath(v.Top)); err != nil {
			return "", err
		}
	}
	id := newLayerID()
	if err := s.createLayerFile(id, old.Size); err != nil {
		return "", err
	}
	frozen := v.Top
	old.State = Frozen
	m.Layers[id] = &LayerMeta{Parent: frozen, Size: old.Size, State: Active}
	v.Top = id
	if snap != "" {
		m.Snapshots[snap] = &SnapshotMeta{Layer: frozen, Source: volume, Created: time.Now().UTC(), Labels: labels}
	}
	return frozen, nil
}

// finishGrow extends the file at path to size, durably, if it is shorter.
func finishGrow(path string, size int64) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("finish resize: %w", err)
	}
	if fi.Size() >= size {
		return nil
	}
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("finish resize: %w", err)
	}
	return syncFile(path)
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	defer f.Close()
	return fdatasync(f)
}

// Snapshot is Store.Snapshot on an open volume: it quiesces the chain's I/O, flushes,
// freezes the top and switches to a new one. The snapshot holds exactly the writes
// completed before the call; the chain stays usable throughout.
func (c *Chain) Snapshot(snap string, labels map[string]string) error {
	if err := ValidateName(snap); err != nil {
		return err
	}
	_, err := c.freeze(nil, func(m *manifest) (string, error) {
		return c.store.freezeTop(m, c.name, snap, labels, false)
	})
	return err
}

// freeze quiesces the chain once the store is locked (see quiescedTx), runs quiesced (if
// any) with the chain still, flushes it, commits freeze's manifest change, moves the chain
// onto the new top that freeze made and lets its I/O go on.
func (c *Chain) freeze(quiesced func(), freeze func(m *manifest) (string, error)) (string, error) {
	locked := false
	defer func() {
		if locked {
			c.io.Unlock()
		}
	}()
	var sw topSwitch
	err := c.store.quiescedTx(func() error {
		c.io.Lock()
		locked = true
		if quiesced != nil {
			quiesced()
		}
		return c.flushForFreeze()
	}, func(m *manifest) error {
		var err error
		sw, err = c.prepareSwitch(m, freeze)
		return err
	})
	if err != nil && !committed(err) {
		sw.abort()
		return "", err
	}
	c.adopt(sw)
	return sw.frozen, err
}

// flushForFreeze makes everything written so far durable before the top is frozen. c.io is
// held exclusively.
func (c *Chain) flushForFreeze() error {
	if c.closed {
		return ErrClosed
	}
	if c.top < 0 {
		return fmt.Errorf("snapshot %s: %w", c.name, ErrReadOnly)
	}
	return c.flushLocked()
}

// topSwitch is a frozen top and the new top that replaces it, opened before the manifest
// naming it is committed, so that a committed switch never leaves the chain without a top.
type topSwitch struct {
	frozen, newTop string
	f              *os.File // nil when the top stays (it was empty)
}

// prepareSwitch runs freeze inside a transaction and opens the new top it made.
func (c *Chain) prepareSwitch(m *manifest, freeze func(m *manifest) (string, error)) (topSwitch, error) {
	frozen, err := freeze(m)
	if err != nil {
		return topSwitch{}, err
	}
	sw := topSwitch{frozen: frozen, newTop: m.Volumes[c.name].Top}
	if sw.newTop != c.layers[c.top].id {
		if sw.f, err = os.OpenFile(c.store.layerPath(sw.newTop), os.O_RDWR, 0); err != nil {
			return sw, fmt.Errorf("open new top of %s: %w", c.name, err)
		}
	}
	return sw, nil
}

func (sw topSwitch) abort() {
	if sw.f != nil {
		sw.f.Close()
	}
}

// adopt moves the chain onto a committed new top. The old top's spans in the index become
// a frozen layer's by the top index moving up: nothing in the index changes.
func (c *Chain) adopt(sw topSwitch) {
	if sw.f == nil {
		return
	}
	c.layers[c.top].meta.State = Frozen
	// What the top holds now is not at hand without a walk of the index: count all of it.
	c.layers[c.top].view.span = c.size
	c.layers = append(c.layers, &openLayer{id: sw.newTop, meta: LayerMeta{Parent: sw.frozen, Size: c.size, State: Active}, f: sw.f})
	c.top = len(c.layers) - 1
	c.idxMu.Lock()
	c.topEmpty = true
	c.zeroCand = newRangeMap[bool]()
	c.idxMu.Unlock()
}

// SnapshotGroup takes snapshots of several volumes at one point in time: every volume open
// in this process is quiesced and flushed, all are frozen in one manifest commit, and then
// they all go on. snaps[i] names the snapshot of volumes[i]. Either every snapshot exists
// afterwards or none does.
//
// A volume held by this process (attached composed) cannot be quiesced: its top is cloned
// at one instant inside the commit, while the others stand still, which is still one point
// in time. Two held volumes would be cloned at two instants with writes going on between
// them, so a group takes at most one (ErrBusy).
func (s *Store) SnapshotGroup(volumes, snaps []string, labels map[string]string) error {
	if len(volumes) == 0 || len(volumes) != len(snaps) {
		return fmt.Errorf("snapshot group: %w: %d volumes, %d snapshot names", ErrInvalidName, len(volumes), len(snaps))
	}
	seen := map[string]bool{}
	for i := range volumes {
		for _, n := range []string{volumes[i], snaps[i]} {
			if err := ValidateName(n); err != nil {
				return err
			}
			if seen[n] {
				return fmt.Errorf("snapshot group: %w: %s appears twice", ErrInvalidName, n)
			}
			seen[n] = true
		}
	}
	order := make([]int, len(volumes))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return volumes[order[a]] < volumes[order[b]] })
	live := map[string]*Chain{}
	var quiesced []*Chain
	var locks []*os.File
	heldBy := "" // the held volume of the group, if any
	defer func() {
		closeAll(locks)
		for _, c := range quiesced {
			c.io.Unlock()
		}
	}()
	for _, i := range order {
		v := volumes[i]
		if c := s.openVolume(v); c != nil {
			live[v] = c
			continue
		}
		if err := s.mustBeVolume(v); err != nil {
			return err
		}
		if s.isHeld(v) { // this process holds its lock already
			if heldBy != "" {
				return fmt.Errorf("snapshot group: %w: %s and %s are both attached composed, and a group can stop the writes of one such volume only; attach all but one merged", ErrBusy, heldBy, v)
			}
			heldBy = v
			continue
		}
		if s.locksVolume(v) { // open read-only here: nobody writes it
			continue
		}
		lk, err := s.lockVolume(v, unix.LOCK_EX)
		if err != nil {
			return err
		}
		locks = append(locks, lk)
	}
	// Quiesced in name order, so two groups over the same volumes cannot deadlock.
	quiesce := func() error {
		for _, i := range order {
			if c := live[volumes[i]]; c != nil {
				c.io.Lock()
				quiesced = append(quiesced, c)
				if err := c.flushForFreeze(); err != nil {
					return err
				}
			}
		}
		return nil
	}
	switches := map[string]topSwitch{}
	err := s.quiescedTx(quiesce, func(m *manifest) error {
		for i, v := range volumes {
			freeze := func(m *manifest) (string, error) { return s.freezeTop(m, v, snaps[i], labels, live[v] == nil) }
			if c := live[v]; c != nil {
				sw, err := c.prepareSwitch(m, freeze)
				switches[v] = sw
				if err != nil {
					return err
				}
			} else if _, err := freeze(m); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil && !committed(err) {
		for _, sw := range switches {
			sw.abort()
		}
		return err
	}
	for v, sw := range switches {
		live[v].adopt(sw)
	}
	return err
}

// Clone makes volume name a new chain over src, a snapshot or a volume. A volume's top is
// frozen first (unnamed) unless it is empty, in which case the clone shares its parent.
// No data is copied.
func (s *Store) Clone(src, name string, labels map[string]string) error {
	if err := ValidateName(src); err != nil {
		return err
	}
	if err := ValidateName(name); err != nil {
		return err
	}
	// The clone has the source's size, which may exceed the size of the layer it builds on.
	addClone := func(m *manifest, under string, size int64) error {
		if err := nameFree(m, name); err != nil {
			return err
		}
		id := newLayerID()
		if err := s.createLayerFile(id, size); err != nil {
			return err
		}
		m.Layers[id] = &LayerMeta{Parent: under, Size: size, State: Active}
		m.Volumes[name] = &VolumeMeta{Top: id, Created: time.Now().UTC(), Labels: labels}
		return nil
	}
	err := s.tx(func(m *manifest) error {
		sn := m.Snapshots[src]
		if sn == nil {
			if m.Volumes[src] == nil {
				return fmt.Errorf("clone source %s: %w", src, ErrNotFound)
			}
			return errIsVolume
		}
		return addClone(m, sn.Layer, m.Layers[sn.Layer].Size)
	})
	if !errors.Is(err, errIsVolume) {
		return err
	}
	freezeAndClone := func(m *manifest, topEmpty bool) (string, error) {
		if err := nameFree(m, name); err != nil {
			return "", err
		}
		v := m.Volumes[src]
		if v == nil {
			return "", fmt.Errorf("clone source %s: %w", src, ErrNotFound)
		}
		under, size := "", m.Layers[v.Top].Size
		// An empty top may be skipped, unless it is opaque: then it hides all below it.
		if p := m.Layers[v.Top].Parent; topEmpty && !m.Layers[v.Top].Opaque && p != "" && m.Layers[p].State == Frozen {
			under = p
		} else {
			var err error
			if under, err = s.freezeTop(m, src, "", nil, false); err != nil {
				return "", err
			}
		}
		return under, addClone(m, under, size)
	}
	return s.withVolume(src,
		func(c *Chain) error {
			var empty bool
			_, err := c.freeze(func() {
				c.idxMu.RLock()
				empty = c.topEmpty
				c.idxMu.RUnlock()
			}, func(m *manifest) (string, error) { return freezeAndClone(m, empty) })
			return err
		},
		func() error {
			return s.tx(func(m *manifest) error {
				v := m.Volumes[src]
				if v == nil {
					return fmt.Errorf("clone source %s: %w", src, ErrNotFound)
				}
				empty, err := s.layerEmpty(v.Top)
				if err != nil {
					return err
				}
				if !empty {
					if err := syncFile(s.layerPath(v.Top)); err != nil {
						return err
					}
				}
				_, err = freezeAndClone(m, empty)
				return err
			})
		})
}

var errIsVolume = errors.New("source is a volume")

// layerEmpty reports whether layer id holds no data and no zero list.
func (s *Store) layerEmpty(id string) (bool, error) {
	if _, err := os.Stat(s.zeroPath(id)); err == nil {
		return false, nil
	}
	f, err := os.Open(s.layerPath(id))
	if err != nil {
		return false, fmt.Errorf("layer %s: %w", id, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("layer %s: %w", id, err)
	}
	data, err := dataExtents(f, fi.Size())
	return len(data) == 0, err
}

// Resize grows volume to size bytes (rounded up to BlockSize). Shrinking is refused: it
// would cut data off every snapshot-consistent view of the volume.
func (s *Store) Resize(volume string, size int64) error {
	return s.withVolume(volume,
		func(c *Chain) error { return c.Resize(size) },
		func() error { return s.resizeTop(volume, size, nil) })
}

// resizeTop commits the new size, then grows the top file with grow, or by its path when
// grow is nil (an open top finishes a grow that a crash cut short, see openLayerFile).
func (s *Store) resizeTop(volume string, size int64, grow func() error) error {
	size = alignUp(size)
	var path string
	var old int64
	err := s.tx(func(m *manifest) error {
		v := m.Volumes[volume]
		if v == nil {
			return fmt.Errorf("volume %s: %w", volume, ErrNotFound)
		}
		top := m.Layers[v.Top]
		if size < top.Size {
			return fmt.Errorf("resize %s to %d bytes: %w (it has %d)", volume, size, ErrShrink, top.Size)
		}
		old, top.Size = top.Size, size
		path = s.layerPath(v.Top)
		return nil
	})
	if err != nil && !committed(err) {
		return err
	}
	txErr := err
	if grow == nil {
		err = os.Truncate(path, size)
	} else {
		err = grow()
	}
	if err != nil {
		// The file system refuses the size (EFBIG, ENOSPC): take the commit back, or every
		// open would try to finish the grow, fail, and the volume could not open again.
		s.tx(func(m *manifest) error {
			if v := m.Volumes[volume]; v != nil && m.Layers[v.Top].Size == size {
				m.Layers[v.Top].Size = old
			}
			return nil
		})
		return fmt.Errorf("resize %s: %w", volume, err)
	}
	return txErr
}

// Resize grows an open volume; see Store.Resize. The size is committed first, without the
// chain's I/O stopped (the store's lock comes before c.io, see quiescedTx); then the chain
// stops its I/O for the grow of its top file and takes up the size.
func (c *Chain) Resize(size int64) error {
	c.resizeMu.Lock() // one resize at a time: a smaller grow must not truncate after a larger
	defer c.resizeMu.Unlock()
	c.io.RLock()
	closed, readOnly := c.closed, c.top < 0
	c.io.RUnlock()
	switch {
	case closed:
		return ErrClosed
	case readOnly:
		return fmt.Errorf("resize %s: %w", c.name, ErrReadOnly)
	case size <= 0:
		return fmt.Errorf("resize %s: %w: %d", c.name, ErrInvalidSize, size)
	}
	return c.store.resizeTop(c.name, size, func() error {
		c.io.Lock()
		defer c.io.Unlock()
		if c.closed {
			return ErrClosed
		}
		// The top may be newer than the one the size was committed for (a snapshot in
		// between); a snapshot finishes the grow of the top it freezes, and its new top is
		// made at the committed size, so growing the current one is right either way.
		if err := c.layers[c.top].f.Truncate(alignUp(size)); err != nil {
			return err
		}
		c.size = alignUp(size)
		c.layers[c.top].meta.Size = c.size
		return nil
	})
}

// DeleteVolume removes a volume and frees every layer nobody else uses. It returns once the
// freed files are unlinked, which happens after the store lock is released (see trash.go).
func (s *Store) DeleteVolume(name string) error {
	// The volume locks are released before the wait: an unlink can take minutes, and merge
	// targets must be openable meanwhile.
	err := s.deleteVolume(name)
	if err == nil {
		s.waitFreed()
	}
	return err
}

func (s *Store) deleteVolume(name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if s.openVolume(name) != nil {
		return fmt.Errorf("volume %s: %w: it is open", name, ErrBusy)
	}
	if err := s.mustBeVolume(name); err != nil {
		return err
	}
	lk, err := s.lockVolume(name, unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer lk.Close()
	var held []*os.File
	defer func() { closeAll(held) }()
	err = s.tx(func(m *manifest) error {
		if m.Volumes[name] == nil {
			return fmt.Errorf("volume %s: %w", name, ErrNotFound)
		}
		delete(m.Volumes, name)
		return s.collect(m, &held)
	})
	if err == nil {
		os.Remove(s.lockPath(name))
	}
	return err
}

// DeleteSnapshot removes a snapshot's name. Its layer is merged away (into its only child,
// or its parent) or freed as soon as no chain needs it any more; while clones or restored
// volumes still build on it, it stays. Like DeleteVolume, it returns once the freed files are
// unlinked.
func (s *Store) DeleteSnapshot(name string) error {
	err := s.deleteSnapshot(name)
	if err == nil {
		s.waitFreed()
	}
	return err
}

func (s *Store) deleteSnapshot(name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	var held []*os.File
	defer func() { closeAll(held) }()
	return s.tx(func(m *manifest) error {
		if m.Snapshots[name] == nil {
			return fmt.Errorf("snapshot %s: %w", name, ErrNotFound)
		}
		delete(m.Snapshots, name)
		return s.collect(m, &held)
	})
}

// Collect frees unreferenced layers and merges away unnamed ones that only lengthen a
// chain. Each store operation does this itself; Collect is for after a crash or when an
// open volume held a merge back. It also empties the trash, of whatever a crash left there
// too, and returns once that is done.
func (s *Store) Collect() error {
	err := s.collectTx()
	if terr := s.emptyTrashNow(); err == nil {
		err = terr
	}
	return err
}

func (s *Store) collectTx() error {
	var held []*os.File
	defer func() { closeAll(held) }()
	return s.tx(func(m *manifest) error { return s.collect(m, &held) })
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// collect runs inside a transaction. Reference counts are derived, never stored: a layer is
// needed while a volume or a snapshot reaches it through parent links. Locks of volumes
// whose tops it merges into are appended to held and must stay held until the commit.
func (s *Store) collect(m *manifest, held *[]*os.File) error {
	for {
		if err := m.dropUnreferenced(); err != nil {
			return err
		}
		l, into, err := s.nextFold(m, held)
		if err != nil || l == "" {
			return err
		}
		if into == m.Layers[l].Parent {
			err = s.foldIntoParent(m, l)
		} else {
			err = s.foldIntoChild(m, l, into)
		}
		if err != nil {
			return err
		}
	}
}

// dropUnreferenced removes the manifest entries of layers no volume or snapshot reaches.
func (m *manifest) dropUnreferenced() error {
	needed := map[string]bool{}
	var roots []string
	for _, v := range m.Volumes {
		roots = append(roots, v.Top)
	}
	for _, sn := range m.Snapshots {
		roots = append(roots, sn.Layer)
	}
	for _, r := range roots {
		ids, err := m.ancestry(r)
		if err != nil {
			return err
		}
		for _, id := range ids {
			needed[id] = true
		}
	}
	for id := range m.Layers {
		if !needed[id] {
			delete(m.Layers, id)
		}
	}
	return nil
}

// nextFold picks an unnamed frozen layer that can be merged away: into its only child, or,
// when it has several, into its parent if that parent is unnamed, frozen, of the same size
// and has no other child. A child that is the top of a volume open anywhere is skipped.
// Either way the layer's own data is what gets copied, so of several candidates the one
// holding the least data goes first.
func (s *Store) nextFold(m *manifest, held *[]*os.File) (layer, into string, err error) {
	kids := m.children()
	named := m.snapshotsOf()
	topOf := map[string]string{}
	for name, v := range m.Volumes {
		topOf[v.Top] = name
	}
	type candidate struct {
		layer, into string
		cost        int64
	}
	var cands []candidate
	for id, l := range m.Layers {
		if l.State != Frozen || len(named[id]) > 0 {
			continue
		}
		switch k := kids[id]; {
		case len(k) == 1:
			cands = append(cands, candidate{id, k[0], s.allocated(id)})
		case len(k) > 1 && !l.Opaque: // an opaque layer's holes must go on hiding the parent
			p := m.Layers[l.Parent]
			if p != nil && p.State == Frozen && len(named[l.Parent]) == 0 && len(kids[l.Parent]) == 1 && p.Size == l.Size {
				cands = append(cands, candidate{id, l.Parent, s.allocated(id)})
			}
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].cost != cands[j].cost {
			return cands[i].cost < cands[j].cost
		}
		return cands[i].layer < cands[j].layer
	})
	for _, c := range cands {
		// Folding into an opaque child copies nothing and leaves its file alone.
		if vol, ok := topOf[c.into]; ok && !m.Layers[c.into].Opaque {
			if s.openVolume(vol) != nil {
				continue
			}
			lk, err := s.lockVolume(vol, unix.LOCK_EX)
			if errors.Is(err, ErrBusy) {
				continue
			}
			if err != nil {
				return "", "", err
			}
			*held = append(*held, lk)
		}
		return c.layer, c.into, nil
	}
	return "", "", nil
}

// allocated returns the bytes a layer file takes on disk (0 if it cannot be read).
func (s *Store) allocated(id string) int64 {
	var st unix.Stat_t
	if unix.Stat(s.layerPath(id), &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// foldIntoChild merges layer l into its only child c: l's data goes where c holds neither
// data nor a zero-list entry, l's zero list likewise. The child's merged view is unchanged
// at every step, so a crash half way leaves a correct store and the fold is simply redone.
func (s *Store) foldIntoChild(m *manifest, l, c string) error {
	lm, cm := m.Layers[l], m.Layers[c]
	if cm.Opaque { // the child hides l entirely
		cm.Parent = lm.Parent
		delete(m.Layers, l)
		return nil
	}
	lData, lZero, err := s.presence(l, lm)
	if err != nil {
		return err
	}
	cData, cZero, err := s.presence(c, cm)
	if err != nil {
		return err
	}
	covered := union(cData, cZero)
	if err := s.copyRanges(l, c, subtract(lData, covered)); err != nil {
		return err
	}
	if add := subtract(lZero, covered); len(add) > 0 {
		if err := writeZeroList(s.zeroPath(c), union(cZero, add)); err != nil {
			return err
		}
	}
	if err := syncFile(s.layerPath(c)); err != nil {
		return err
	}
	cm.Parent = lm.Parent
	// The child's holes fell through to l; if l's holes read zero, the child's must now.
	cm.Opaque = lm.Opaque
	delete(m.Layers, l)
	return nil
}

// foldIntoParent merges layer l into its parent p, which l alone builds on: l's data
// overwrites p's, l's zero list joins p's and punches p there. Until the commit l still
// hides every range of p that changes, so a crash half way is harmless.
func (s *Store) foldIntoParent(m *manifest, l string) error {
	lm := m.Layers[l]
	p := lm.Parent
	pm := m.Layers[p]
	lData, lZero, err := s.presence(l, lm)
	if err != nil {
		return err
	}
	_, pZero, err := s.presence(p, pm)
	if err != nil {
		return err
	}
	if err := s.copyRanges(l, p, lData); err != nil {
		return err
	}
	// A zero-list entry under data of its own layer is stale (data wins): it must not punch
	// the data just copied.
	lZero = subtract(lZero, lData)
	if len(lZero) > 0 || len(pZero) > 0 {
		if err := writeZeroList(s.zeroPath(p), union(subtract(pZero, lData), lZero)); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(s.layerPath(p), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("fold into %s: %w", p, err)
	}
	defer f.Close()
	for _, z := range lZero {
		if err := punchHole(f, z.Off, z.Len); err != nil {
			return err
		}
	}
	if err := fdatasync(f); err != nil {
		return err
	}
	for _, k := range m.Layers {
		if k.Parent == l {
			k.Parent = p
		}
	}
	delete(m.Layers, l)
	return nil
}

// presence reads a layer's data extents and zero list from disk.
func (s *Store) presence(id string, meta *LayerMeta) (data, zeros []Extent, err error) {
	f, err := os.Open(s.filePath(id, meta))
	if err != nil {
		return nil, nil, fmt.Errorf("layer %s: %w", id, err)
	}
	defer f.Close()
	if data, err = dataExtents(f, meta.Size); err != nil {
		return nil, nil, err
	}
	if meta.State != Base {
		if zeros, err = readZeroList(s.zeroPath(id), meta.Size); err != nil {
			return nil, nil, err
		}
	}
	return data, zeros, nil
}

// copyRanges copies the ranges from layer src to the same offsets of layer dst, with
// copy_file_range (a reflink on xfs and btrfs, an in-kernel copy elsewhere).
func (s *Store) copyRanges(src, dst string, ranges []Extent) error {
	if len(ranges) == 0 {
		return nil
	}
	in, err := os.Open(s.layerPath(src))
	if err != nil {
		return fmt.Errorf("merge %s: %w", src, err)
	}
	defer in.Close()
	out, err := os.OpenFile(s.layerPath(dst), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("merge into %s: %w", dst, err)
	}
	defer out.Close()
	s.mu.Lock()
	report := s.progress
	s.mu.Unlock()
	return copyExtents(out, in, ranges, report)
}

// copyExtents copies the ranges of in to the same offsets of out with copyRange. progress,
// if set, is told the bytes copied so far of the ranges' total, from 0 on.
func copyExtents(out, in *os.File, ranges []Extent, progress func(done, total int64)) error {
	var total, done int64
	for _, r := range ranges {
		total += r.Len
	}
	if progress != nil {
		progress(0, total)
	}
	for _, r := range ranges {
		err := copyRange(out, in, r.Off, r.Len, func(n int64) {
			if done += n; progress != nil {
				progress(done, total)
			}
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// copyRange copies n bytes at off from in to the same offset of out, falling back to
// read and write where copy_file_range cannot (across file systems on old kernels).
// progress, if set, is told of each chunk done.
func copyRange(out, in *os.File, off, n int64, progress func(int64)) error {
	const chunk = 64 << 20
	for n > 0 {
		roff, woff := off, off
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(min(n, chunk)), 0)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EXDEV || err == unix.EINVAL || err == unix.ENOSYS || err == unix.EOPNOTSUPP {
			return copyByHand(out, in, off, n, progress)
		}
		if err != nil {
			return fmt.Errorf("copy %s to %s at %d: %w", in.Name(), out.Name(), off, err)
		}
		if c == 0 {
			return fmt.Errorf("copy %s to %s at %d: %w", in.Name(), out.Name(), off, io.ErrUnexpectedEOF)
		}
		off, n = off+int64(c), n-int64(c)
		if progress != nil {
			progress(int64(c))
		}
	}
	return nil
}

func copyByHand(out, in *os.File, off, n int64, progress func(int64)) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		p := buf[:min(n, int64(len(buf)))]
		if err := preadFull(in, p, off); err != nil {
			return err
		}
		if err := pwriteFull(out, p, off); err != nil {
			return err
		}
		off, n = off+int64(len(p)), n-int64(len(p))
		if progress != nil {
			progress(int64(len(p)))
		}
	}
	return nil
}
