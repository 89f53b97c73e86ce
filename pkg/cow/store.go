package cow

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Store is a directory of layers and the manifest that ties them into chains:
//
//	DIR/manifest.json        the chain metadata, replaced atomically
//	DIR/layers/ID.raw        a layer: a sparse raw file at its volume's size
//	DIR/layers/ID.zero       its zero list, when it has one
//	DIR/locks/NAME.lock      held (flock) while a volume is open
//	DIR/.lock                held while the manifest is read (shared) or changed (exclusive)
//	DIR/.trash/              freed files, unlinked after the lock is released (see trash.go)
//
// Several processes may use one store: every change is a transaction under DIR/.lock, and
// an open volume is locked against changes by anyone but its opener.
type Store struct {
	dir string

	mu       sync.Mutex
	open     map[string]*Chain   // volumes open read-write in this process
	held     map[string]*os.File // volumes this process holds without a chain (see Hold)
	readers  map[string]int      // volumes open read-only in this process: how many chains
	progress func(done, total int64)

	trash trasher
}

// SetMergeProgress makes merges report the bytes copied so far of what they copy (for a
// progress bar); nil stops it.
func (s *Store) SetMergeProgress(fn func(done, total int64)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.progress = fn
}

// OpenStore opens the store in dir, creating it if needed.
func OpenStore(dir string) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", dir, err)
	}
	for _, d := range []string{abs, filepath.Join(abs, "layers"), filepath.Join(abs, "locks")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("store %s: %w", abs, err)
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Join(abs, "layers"), &st); err != nil {
		return nil, fmt.Errorf("store %s: statfs: %w", abs, err)
	}
	if st.Bsize > BlockSize {
		return nil, fmt.Errorf("store %s: %w: file system block size %d is larger than the engine's %d", abs, ErrNotSupported, st.Bsize, BlockSize)
	}
	s := &Store{dir: abs, open: map[string]*Chain{}, held: map[string]*os.File{}, readers: map[string]int{}}
	s.trash.cond.L = &s.trash.mu
	// A new store gets its empty manifest at once: from then on a missing manifest is a lost
	// one (readManifest refuses the store), never a first transaction a crash cut short
	// between its layer file and its manifest.
	if _, err := os.Stat(s.manifestPath()); errors.Is(err, fs.ErrNotExist) {
		if err := s.tx(func(*manifest) error { return nil }); err != nil && !errors.Is(err, ErrCorrupt) {
			return nil, fmt.Errorf("store %s: %w", abs, err)
		}
	}
	// What a crash (or an exit before WaitTrash) left in the trash is unreferenced for good.
	if s.trashPending() {
		s.kickTrash()
	}
	return s, nil
}

// Dir returns the store's absolute path.
func (s *Store) Dir() string { return s.dir }

func (s *Store) manifestPath() string       { return filepath.Join(s.dir, "manifest.json") }
func (s *Store) layerPath(id string) string { return filepath.Join(s.dir, "layers", id+".raw") }
func (s *Store) zeroPath(id string) string  { return filepath.Join(s.dir, "layers", id+".zero") }
func (s *Store) lockPath(name string) string {
	return filepath.Join(s.dir, "locks", name+".lock")
}

// filePath is where the data of layer id lives.
func (s *Store) filePath(id string, l *LayerMeta) string {
	if !l.inStore() {
		return l.Path
	}
	return s.layerPath(id)
}

// lockStore takes DIR/.lock shared or exclusive. Each call opens the file anew: flock belongs
// to the open file description, so goroutines of one process exclude each other too.
func (s *Store) lockStore(how int) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(s.dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock store: %w", err)
	}
	if err := flock(f, how); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// read returns the current manifest under a shared lock held until release is called.
func (s *Store) read() (m *manifest, release func(), err error) {
	lk, err := s.lockStore(unix.LOCK_SH)
	if err != nil {
		return nil, nil, err
	}
	m, err = readManifest(s.manifestPath())
	if err != nil {
		lk.Close()
		return nil, nil, err
	}
	return m, func() { lk.Close() }, nil
}

// tx runs fn on the manifest under the exclusive store lock and commits what it changed.
// fn creates the files that the new manifest needs before returning; files the old one
// needed and the new one does not are moved to the trash after the commit (see collect),
// and unlinked in the background once the lock is released.
func (s *Store) tx(fn func(m *manifest) error) error { return s.quiescedTx(nil, fn) }

// quiescedTx is tx with quiesce run first, once the store lock is held: live chains stop
// their I/O there (c.io), so that the wait for the lock, which a long transaction of another
// process (a merge copying a layer) can make minutes long, does not stop their devices.
// The lock order is the store's lock, then c.io: nothing holding c.io waits for the store.
// quiesce must not read the store (its shared lock would wait for this exclusive one).
func (s *Store) quiescedTx(quiesce func() error, fn func(m *manifest) error) error {
	moved, err := s.txLocked(quiesce, fn)
	if moved {
		s.kickTrash()
	}
	return err
}

func (s *Store) txLocked(quiesce func() error, fn func(m *manifest) error) (moved bool, err error) {
	lk, err := s.lockStore(unix.LOCK_EX)
	if err != nil {
		return false, err
	}
	defer lk.Close()
	if quiesce != nil {
		if err := quiesce(); err != nil {
			return false, err
		}
	}
	m, err := readManifest(s.manifestPath())
	if err != nil {
		return false, err
	}
	before, err := json.Marshal(m)
	if err != nil {
		return false, fmt.Errorf("encode manifest: %w", err)
	}
	if err := fn(m); err != nil {
		return false, err
	}
	// (a new store's manifest is written even when fn changes nothing)
	written := false
	if after, err := json.Marshal(m); err != nil || m.unwritten || !bytes.Equal(before, after) {
		if err := m.write(s.manifestPath()); err != nil {
			return false, err
		}
		written = true
	}
	moved, err = s.trashUnlisted(m) // also what a crashed transaction left, when nothing changed
	if err != nil && written {
		err = &committedError{err: err}
	}
	return moved, err
}

// committedError is a failure after a transaction's commit point, the rename of the new
// manifest: the change stands, and whoever keeps state that follows the manifest (a live
// chain's top) must follow it, though the caller still hears of the failure.
type committedError struct{ err error }

func (e *committedError) Error() string { return fmt.Sprintf("committed, then failed: %v", e.err) }
func (e *committedError) Unwrap() error { return e.err }

// committed reports whether err, from a transaction, came after its commit.
func committed(err error) bool {
	var ce *committedError
	return errors.As(err, &ce)
}

// trashUnlisted moves the files the manifest does not name into the trash: layers freed by
// the transaction just committed, or leftovers of one that crashed before its commit. It
// runs under the exclusive store lock, so no transaction is half way. It only renames: the
// unlink, which can take minutes for a large fragmented file, happens without the lock.
func (s *Store) trashUnlisted(m *manifest) (moved bool, err error) {
	// Manifest temp files are written only under the exclusive store lock, which the caller
	// holds: any there now is left by a transaction that crashed.
	tmps, _ := filepath.Glob(filepath.Join(s.dir, ".manifest.json.tmp-*"))
	entries, err := os.ReadDir(filepath.Join(s.dir, "layers"))
	if err != nil {
		return false, fmt.Errorf("list layers: %w", err)
	}
	var unused []string
	for _, e := range entries {
		id, _, _ := strings.Cut(e.Name(), ".")
		if l := m.Layers[id]; l != nil && l.inStore() {
			continue
		}
		if strings.HasPrefix(e.Name(), ".") {
			// A temp file of an atomic write: a live chain may be writing its zero list now
			// (without the store lock); only an old one is a crash leftover.
			if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < time.Hour {
				continue
			}
		}
		unused = append(unused, filepath.Join(s.dir, "layers", e.Name()))
	}
	if len(tmps) == 0 && len(unused) == 0 {
		return false, nil
	}
	// Made on demand: a store that never frees anything has none.
	if err := os.Mkdir(s.trashDir(), 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return false, fmt.Errorf("make trash: %w", err)
	}
	for _, t := range tmps {
		ok, _ := s.moveToTrash(t) // one that stays is tidied by the next transaction
		moved = moved || ok
	}
	removed := false
	for _, path := range unused {
		ok, err := s.moveToTrash(path)
		if err != nil {
			return moved, fmt.Errorf("remove unused layer file: %w", err)
		}
		moved = moved || ok
		removed = removed || ok
	}
	if removed {
		return moved, syncDir(filepath.Join(s.dir, "layers"))
	}
	return moved, nil
}

// createLayerFile makes an empty layer file of the given size: sparse, no extent size hint,
// durable before the manifest that names it is written.
func (s *Store) createLayerFile(id string, size int64) error {
	path := s.layerPath(id)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create layer: %w", err)
	}
	err = clearExtentSizeHint(f)
	if err == nil {
		err = f.Truncate(size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("create layer %s: %w", id, err)
	}
	return nil
}

// CreateOptions describe a new volume.
type CreateOptions struct {
	// Size is the virtual size in bytes, rounded up to BlockSize. Zero means the base's size.
	Size int64
	// Base is the path of a regular raw file to build on; it is only ever read.
	Base   string
	Labels map[string]string
}

// Create makes a new volume: an empty top layer, over the base if one is given.
func (s *Store) Create(name string, opts CreateOptions) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if opts.Size < 0 {
		return fmt.Errorf("create %s: %w: %d", name, ErrInvalidSize, opts.Size)
	}
	return s.tx(func(m *manifest) error {
		if err := nameFree(m, name); err != nil {
			return err
		}
		// The base is looked at under the store lock: RemoveBase cannot take it away meanwhile.
		size, parent := opts.Size, ""
		if opts.Base != "" {
			base, err := s.describeBase(opts.Base)
			if err != nil {
				return fmt.Errorf("create %s: %w", name, err)
			}
			if size == 0 {
				size = base.Size
			}
			if size < base.Size {
				return fmt.Errorf("create %s: %w: %d bytes is smaller than the base (%d bytes)", name, ErrInvalidSize, size, base.Size)
			}
			parent = m.baseLayer(base)
		}
		if size == 0 {
			return fmt.Errorf("create %s: %w: a volume without a base needs a size", name, ErrInvalidSize)
		}
		size = alignUp(size)
		id := newLayerID()
		if err := s.createLayerFile(id, size); err != nil {
			return err
		}
		m.Layers[id] = &LayerMeta{Parent: parent, Size: size, State: Active}
		m.Volumes[name] = &VolumeMeta{Top: id, Created: time.Now().UTC(), Labels: opts.Labels}
		return nil
	})
}

// nameFree fails when a volume or snapshot already has the name: the two share one namespace
// so that a name says what it is.
func nameFree(m *manifest, name string) error {
	if m.Volumes[name] != nil {
		return fmt.Errorf("volume %s: %w", name, ErrExists)
	}
	if m.Snapshots[name] != nil {
		return fmt.Errorf("%s: %w as a snapshot", name, ErrExists)
	}
	return nil
}

// describeBase checks that path is a regular file outside the store and describes it.
func (s *Store) describeBase(path string) (*LayerMeta, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("base %s: %w", path, err)
	}
	if rel, err := filepath.Rel(filepath.Join(s.dir, "layers"), abs); err == nil && !strings.HasPrefix(rel, "..") {
		return nil, fmt.Errorf("base %s: %w: a layer of the store cannot be a base", path, ErrInvalidName)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("base %s: %w: %w", path, ErrNotFound, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("base %s: %w: not a regular file", path, ErrNotSupported)
	}
	return &LayerMeta{State: Base, Path: abs, Size: fi.Size(), MTime: fi.ModTime().UnixNano()}, nil
}

// baseLayer returns the id of the manifest's entry for base, adding one if needed, so that
// all chains over one base file share one entry. A base copied into the store stands for
// its origin as long as the origin is unchanged: new chains over the file share the copy.
func (m *manifest) baseLayer(base *LayerMeta) string {
	found := ""
	for id, l := range m.Layers {
		switch {
		case l.State != Base:
		case l.Origin == base.Path && l.OriginMTime == base.MTime && l.Size == base.Size:
			return id
		case *l == *base:
			found = id
		}
	}
	if found != "" {
		return found
	}
	id := newLayerID()
	m.Layers[id] = base
	return id
}

// OpenOptions tune how a volume is opened.
type OpenOptions struct {
	ReadOnly bool
}

// Open opens a volume. Read-write, it holds the volume's lock exclusively until Close:
// nobody else can open it or change its chain meanwhile.
func (s *Store) Open(name string, opts OpenOptions) (*Chain, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	v := m.Volumes[name]
	if v == nil {
		return nil, fmt.Errorf("volume %s: %w", name, ErrNotFound)
	}
	how := unix.LOCK_EX
	if opts.ReadOnly {
		how = unix.LOCK_SH
	}
	lk, err := s.lockVolume(name, how)
	if err != nil {
		return nil, err
	}
	c, err := s.openChain(m, name, v.Top, !opts.ReadOnly)
	if err != nil {
		lk.Close()
		return nil, err
	}
	c.lockFile = lk
	s.mu.Lock()
	if opts.ReadOnly {
		s.readers[name]++
	} else {
		s.open[name] = c
	}
	s.mu.Unlock()
	return c, nil
}

// OpenSnapshot opens a snapshot's chain read-only.
func (s *Store) OpenSnapshot(name string) (*Chain, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	sn := m.Snapshots[name]
	if sn == nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, ErrNotFound)
	}
	c, err := s.openChain(m, name, sn.Layer, false)
	if err != nil {
		return nil, err
	}
	c.snapshot = true
	return c, nil
}

func (s *Store) lockVolume(name string, how int) (*os.File, error) {
	f, err := os.OpenFile(s.lockPath(name), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock volume %s: %w", name, err)
	}
	if err := flock(f, how|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, ErrBusy) {
			return nil, fmt.Errorf("volume %s: %w: it is open (attached) elsewhere", name, ErrBusy)
		}
		return nil, err
	}
	return f, nil
}

func (s *Store) forget(c *Chain) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[c.name] == c {
		delete(s.open, c.name)
	}
	if c.readOnly && !c.snapshot {
		if s.readers[c.name]--; s.readers[c.name] <= 0 {
			delete(s.readers, c.name)
		}
	}
}

// locksVolume reports whether this process holds volume name's lock already: held, or open
// read-only, whose shared lock keeps every writer out as well as an exclusive one would,
// and would make this process's own exclusive attempt fail.
func (s *Store) locksVolume(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, held := s.held[name]
	return held || s.readers[name] > 0
}

// openChain opens the layers from top down to the base and builds the merged index.
func (s *Store) openChain(m *manifest, name, top string, writable bool) (c *Chain, err error) {
	ids, err := m.ancestry(top)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	ids = ids[m.visibleFrom(ids):] // an opaque layer hides everything below it
	c = &Chain{store: s, name: name, top: -1, readOnly: !writable, idx: newRangeMap[state](),
		zeroCand: newRangeMap[bool](), unpunched: newRangeMap[bool]()}
	opened := &c.layers // an error return sets c to nil before this runs
	defer func() {
		if err != nil {
			for _, l := range *opened {
				l.f.Close()
			}
		}
	}()
	if writable {
		c.top = len(ids) - 1
		if m.Layers[top].State != Active {
			return nil, fmt.Errorf("open %s: %w: top layer %s is %s", name, ErrCorrupt, top, m.Layers[top].State)
		}
	}
	for i, id := range ids {
		meta := *m.Layers[id]
		if i > 0 && meta.State == Base || i < len(ids)-1 && meta.State == Active {
			return nil, fmt.Errorf("open %s: %w: layer %s is %s in the middle of the chain", name, ErrCorrupt, id, meta.State)
		}
		l, zeros, data, err := s.openLayerFile(id, &meta, i == c.top)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", name, err)
		}
		c.layers = append(c.layers, l)
		applyLayer(c.idx, i, c.top, zeros, data)
		if i == c.top {
			c.topEmpty = len(zeros) == 0 && len(data) == 0
			for _, z := range zeros {
				c.zeroCand.set(z.Off, z.End(), true)
			}
		}
	}
	c.size = m.Layers[top].Size
	return c, nil
}

// openLayerFile opens one layer, checks it against the manifest and reads its presence.
// A writable top is readied for writes: no extent size hint, no unwritten extents.
func (s *Store) openLayerFile(id string, meta *LayerMeta, writable bool) (l *openLayer, zeros, data []Extent, err error) {
	path := s.filePath(id, meta)
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if errors.Is(err, fs.ErrNotExist) {
		// The manifest names the file: a missing layer is damage, a missing base a change.
		sentinel := ErrCorrupt
		if !meta.inStore() {
			sentinel = ErrBaseChanged
		}
		return nil, nil, nil, fmt.Errorf("%w: layer %s: %w", sentinel, id, err)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: %w", id, err)
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: %w", id, err)
	}
	if err := baseChanged(path, fi, meta); err != nil {
		return nil, nil, nil, err
	}
	if meta.State == Active && fi.Mode().IsRegular() && fi.Size() < meta.Size {
		// A grow is committed to the manifest before the file follows; finish one a crash cut
		// short (a read-only open reads the missing tail as zeros, which it is).
		if writable {
			if err := f.Truncate(meta.Size); err != nil {
				return nil, nil, nil, fmt.Errorf("layer %s: finish resize: %w", id, err)
			}
		}
	} else if !fi.Mode().IsRegular() || fi.Size() != meta.Size {
		return nil, nil, nil, fmt.Errorf("%w: layer %s (%s) has %d bytes, the manifest says %d", ErrCorrupt, id, path, fi.Size(), meta.Size)
	}
	if meta.State != Base {
		if zeros, err = readZeroList(s.zeroPath(id), meta.Size); err != nil {
			return nil, nil, nil, fmt.Errorf("layer %s: %w", id, err)
		}
	}
	if writable {
		data, err = readyTop(f, meta.Size)
	} else {
		data, err = dataExtents(f, meta.Size)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: %w", id, err)
	}
	return &openLayer{id: id, meta: *meta, f: f, view: layerView{span: mapSpan(data)}}, zeros, data, nil
}

// baseChanged fails with ErrBaseChanged when meta is a base and fi, the file at path, is not
// the one its chains were built on: another size or modification time.
func baseChanged(path string, fi fs.FileInfo, meta *LayerMeta) error {
	if meta.State == Base && (fi.ModTime().UnixNano() != meta.MTime || fi.Size() != meta.Size) {
		return fmt.Errorf("%w: %s was modified after chains were built on it", ErrBaseChanged, path)
	}
	return nil
}

// readyTop makes a writable top safe to write and returns its data extents: its extent size
// hint must be gone (a hint would turn every small write into a large allocation), and
// unwritten extents, the leftovers of writes a crash interrupted, are punched out so that no
// file system can later turn them into written zeros (DESIGN §2).
func readyTop(f *os.File, size int64) ([]Extent, error) {
	hint, err := extentSizeHint(f)
	if err != nil {
		return nil, err
	}
	if hint > 0 {
		if err := clearExtentSizeHint(f); err != nil {
			return nil, fmt.Errorf("%w (%d bytes) that cannot be cleared: %v", ErrExtentHint, hint, err)
		}
	}
	data, unwritten, err := layerExtents(f, size)
	if err != nil {
		return nil, err
	}
	for _, e := range unwritten {
		if err := punchHole(f, e.Off, e.Len); err != nil {
			return nil, err
		}
	}
	return data, nil
}
