package cow

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// An opaque layer holds the whole merged view of its chain: its holes read zero and hide
// every layer below. A composed volume's top is opaque, so a plain loop device on the top
// file serves the volume at native speed, with no engine in the I/O path. On xfs and btrfs
// composing shares blocks (copy_file_range reflinks there) and costs time in proportion to
// the number of extents, not to the data.

// visibleFrom returns the index in ids (bottom first) of the highest opaque layer: the
// layers below it are hidden.
func (m *manifest) visibleFrom(ids []string) int {
	for i := len(ids) - 1; i > 0; i-- {
		if m.Layers[ids[i]].Opaque {
			return i
		}
	}
	return 0
}

// Hold takes a volume for this process without opening its chain: the composed path
// attaches the top file itself. While held, nobody else can open or change the volume;
// this process's Snapshot, Clone and Resize still work on it. Release with the returned
// function.
func (s *Store) Hold(volume string) (release func(), err error) {
	if err := s.mustBeVolume(volume); err != nil {
		return nil, err
	}
	s.mu.Lock()
	_, open := s.open[volume]
	_, held := s.held[volume]
	s.mu.Unlock()
	if open || held {
		return nil, fmt.Errorf("volume %s: %w: already open in this process", volume, ErrBusy)
	}
	lk, err := s.lockVolume(volume, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.held[volume] = lk
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		delete(s.held, volume)
		s.mu.Unlock()
		lk.Close()
	}, nil
}

func (s *Store) isHeld(volume string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.held[volume]
	return ok
}

// Compose makes the volume's top opaque, holding the merged view of its chain, so that the
// top file alone is the volume. Layers stay untouched; the old top is replaced. The volume
// must not be open; a volume held by this process may be composed.
func (s *Store) Compose(volume string) error {
	if err := ValidateName(volume); err != nil {
		return err
	}
	if s.openVolume(volume) != nil {
		return fmt.Errorf("compose %s: %w: it is open", volume, ErrBusy)
	}
	if !s.isHeld(volume) {
		release, err := s.Hold(volume)
		if err != nil {
			return err
		}
		defer release()
	}
	return s.tx(func(m *manifest) error { return s.composeTop(m, volume) })
}

// TopPath returns the file of a volume's top layer: for a composed volume, the whole volume.
func (s *Store) TopPath(volume string) (path string, opaque bool, err error) {
	m, release, err := s.read()
	if err != nil {
		return "", false, err
	}
	defer release()
	v := m.Volumes[volume]
	if v == nil {
		return "", false, fmt.Errorf("volume %s: %w", volume, ErrNotFound)
	}
	return s.layerPath(v.Top), m.Layers[v.Top].Opaque, nil
}

func (s *Store) composeTop(m *manifest, volume string) error {
	v := m.Volumes[volume]
	if v == nil {
		return fmt.Errorf("volume %s: %w", volume, ErrNotFound)
	}
	top := m.Layers[v.Top]
	if top.Opaque {
		return nil
	}
	ids, err := m.ancestry(v.Top)
	if err != nil {
		return err
	}
	ids = ids[m.visibleFrom(ids):]
	if len(ids) == 1 { // nothing below: the top already is the whole volume
		top.Opaque = true
		return nil
	}
	id := newLayerID()
	if err := s.createLayerFile(id, top.Size); err != nil {
		return err
	}
	out, err := os.OpenFile(s.layerPath(id), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("compose %s: %w", volume, err)
	}
	defer out.Close()
	var applied []Extent // over the lowest layer: its own layout is not composing's doing
	for i, lid := range ids {
		data, err := s.applyOnto(out, lid, m.Layers[lid])
		if err != nil {
			return fmt.Errorf("compose %s: %w", volume, err)
		}
		if i > 0 {
			applied = append(applied, data...)
		}
	}
	if err := defragment(out, top.Size, applied); err != nil {
		return fmt.Errorf("compose %s: %w", volume, err)
	}
	if err := fdatasync(out); err != nil {
		return err
	}
	m.Layers[id] = &LayerMeta{Parent: top.Parent, Size: top.Size, State: Active, Opaque: true}
	delete(m.Layers, v.Top)
	v.Top = id
	return nil
}

// applyOnto lays one layer over out, as a read of the chain would see it: its zero list
// punches out what lies below, then its data is copied (reflinked where the file system
// shares blocks). Data written in a layer wins over that layer's own zero list. It returns
// the layer's data extents.
func (s *Store) applyOnto(out *os.File, id string, meta *LayerMeta) ([]Extent, error) {
	data, zeros, err := s.presence(id, meta)
	if err != nil {
		return nil, err
	}
	for _, z := range subtract(zeros, data) {
		if err := punchHole(out, z.Off, z.Len); err != nil {
			return nil, err
		}
	}
	in, err := os.Open(s.filePath(id, meta))
	if err != nil {
		return nil, err
	}
	defer in.Close()
	for _, d := range data {
		// A base may end inside its last block; what lies past its end reads zero.
		if err := copyRange(out, in, d.Off, min(d.Len, meta.Size-d.Off), nil); err != nil {
			return nil, err
		}
	}
	return data, nil
}

// A composed top of a deep chain of scattered writes is a mosaic of small clones: at depth 128
// a 1 MiB read crossed 150 extents and sequential reads ran at a quarter of a plain file's
// speed, while the same bytes in a contiguous file ran at full speed (docs/PERFORMANCE.md).
// So Compose copies a region instead of sharing it where sharing costs more than it saves:
// every region of defragRegion bytes where more than defragExtents pieces of the layers above
// the lowest begin is rewritten in one piece. That copies at most defragRegion/defragExtents
// bytes per piece: compose time still follows the number of extents, not the size; a chain
// written in runs of 128 KiB or more is never copied, nor is a base for its own layout (a
// golden image stays shared by every volume composed over it). (On RAM-backed xfs, 1 MiB reads of composed chains
// with about 15 and 127 pieces per MiB ran at 0.62× and about 0.2× of a contiguous file.)
const (
	defragRegion  = 1 << 20
	defragExtents = 8
	// defragFillGap: holes shorter than this between data in a rewritten region are written
	// as zeros (reads do not change: the top is opaque), so the region becomes one extent.
	defragFillGap = 64 << 10
)

// defragment rewrites the fragmented regions of the composed file out, judged by applied,
// the data extents of the layers laid over the lowest.
func defragment(out *os.File, size int64, applied []Extent) error {
	pieces := map[int64]int{}
	for _, d := range applied {
		pieces[d.Off/defragRegion]++
	}
	var regions []int64
	for r, n := range pieces {
		if n > defragExtents {
			regions = append(regions, r*defragRegion)
		}
	}
	slices.Sort(regions)
	var buf []byte
	for _, off := range regions {
		end := min(off+defragRegion, size)
		data, err := seekDataIn(out, off, end)
		if err != nil {
			return err
		}
		if buf == nil {
			buf = make([]byte, defragRegion)
		}
		if err := rewriteRegion(out, buf[:end-off], off, data); err != nil {
			return err
		}
	}
	return nil
}

// rewriteRegion replaces the region of f at off, whose data lies in data (sorted, inside
// the region), with a fresh copy of itself: read, punch, write back in runs.
func rewriteRegion(f *os.File, buf []byte, off int64, data []Extent) error {
	clear(buf)
	for _, d := range data {
		if err := preadFull(f, buf[d.Off-off:d.End()-off], d.Off); err != nil {
			return err
		}
	}
	if err := punchHole(f, off, int64(len(buf))); err != nil {
		return err
	}
	for i := 0; i < len(data); {
		start, end := data[i].Off, data[i].End()
		for i++; i < len(data) && data[i].Off-end < defragFillGap; i++ {
			end = data[i].End()
		}
		if err := pwriteFull(f, buf[start-off:end-off], start); err != nil {
			return err
		}
	}
	return nil
}

// snapshotOpaqueTop snapshots a held composed volume whose top is attached as a file: the
// top is cloned (FICLONE; a copy where the file system cannot share blocks) into a new
// frozen opaque layer inserted below it. The top stays the top, so the device attached to
// it goes on unchanged. The caller has flushed the device.
func (s *Store) snapshotOpaqueTop(m *manifest, volume, snap string, labels map[string]string) (string, error) {
	v := m.Volumes[volume]
	top := m.Layers[v.Top]
	if !top.Opaque {
		return "", fmt.Errorf("snapshot %s: %w: the volume is held but not composed", volume, ErrNotSupported)
	}
	if snap != "" {
		if err := nameFree(m, snap); err != nil {
			return "", err
		}
	}
	id := newLayerID()
	if err := s.cloneFile(s.layerPath(v.Top), s.layerPath(id), top.Size); err != nil {
		return "", fmt.Errorf("snapshot %s: %w", volume, err)
	}
	m.Layers[id] = &LayerMeta{Parent: top.Parent, Size: top.Size, State: Frozen, Opaque: true}
	top.Parent = id
	if snap != "" {
		m.Snapshots[snap] = &SnapshotMeta{Layer: id, Source: volume, Created: time.Now().UTC(), Labels: labels}
	}
	return id, nil
}

// cloneFile makes dst a copy of src sharing its blocks (FICLONE), or, where the file system
// cannot, a sparse copy of its data. dst is durable when it returns.
func (s *Store) cloneFile(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := fdatasync(in); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := cloneInto(out, in, size, nil); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	return syncDir(s.dir + "/layers")
}

// cloneInto makes the new empty file out a copy of the first size bytes of in: sharing its
// blocks (FICLONE) where the file system can, else copying its data extents, so that its
// holes stay holes. progress, if set, is told the bytes copied so far of the data (a clone
// copies none). out is not synced.
func cloneInto(out, in *os.File, size int64, progress func(done, total int64)) error {
	err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return fmt.Errorf("clone %s: %w", in.Name(), err)
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	data, err := dataExtents(in, size)
	if err != nil {
		return err
	}
	return copyExtents(out, in, data, progress)
}

// Reflinks reports whether the store's file system shares blocks between files (FICLONE):
// where it does, composing a chain copies no data.
func (s *Store) Reflinks() bool {
	dir := s.dir + "/layers"
	a, err := os.CreateTemp(dir, ".reflink-probe-*")
	if err != nil {
		return false
	}
	defer os.Remove(a.Name())
	defer a.Close()
	b, err := os.CreateTemp(dir, ".reflink-probe-*")
	if err != nil {
		return false
	}
	defer os.Remove(b.Name())
	defer b.Close()
	if _, err := a.Write(make([]byte, BlockSize)); err != nil {
		return false
	}
	return unix.IoctlFileClone(int(b.Fd()), int(a.Fd())) == nil
}

// sharedRanges returns the ranges where a and b (both sorted) hold the same physical blocks.
func sharedRanges(a, b []physExtent) []Extent {
	var out []Extent
	j := 0
	for _, ea := range a {
		for j < len(b) && b[j].End() <= ea.Off {
			j++
		}
		for k := j; k < len(b) && b[k].Off < ea.End(); k++ {
			eb := b[k]
			s, e := max(ea.Off, eb.Off), min(ea.End(), eb.End())
			if ea.phys >= 0 && ea.phys+(s-ea.Off) == eb.phys+(s-eb.Off) {
				out = appendExtent(out, s, e)
			}
		}
	}
	return out
}

// changedBetweenFiles compares two opaque layers by their physical extents: what is not
// the same shared block in both has changed. Cloned layers share every block that neither
// rewrote since, so this is exact where a layer-by-layer answer cannot be.
func (s *Store) changedBetweenFiles(a, b string, am, bm *LayerMeta) ([]Extent, error) {
	var maps [2][]physExtent
	for i, l := range []struct {
		id   string
		meta *LayerMeta
	}{{a, am}, {b, bm}} {
		f, err := os.Open(s.filePath(l.id, l.meta))
		if err != nil {
			return nil, err
		}
		maps[i], err = physicalExtents(f, l.meta.Size)
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	var all []Extent
	for _, m := range maps {
		for _, e := range m {
			all = append(all, e.Extent)
		}
	}
	return subtract(normalize(all), normalize(sharedRanges(maps[0], maps[1]))), nil
}
