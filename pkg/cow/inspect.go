package cow

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// LayerInfo describes one layer of a chain.
type LayerInfo struct {
	ID        string     `json:"id"`
	State     LayerState `json:"state"`
	Size      int64      `json:"size"`
	Path      string     `json:"path"`
	Allocated int64      `json:"allocatedBytes"` // space the file takes on disk
	Opaque    bool       `json:"opaque,omitempty"`
	Origin    string     `json:"origin,omitempty"` // a base copied into the store: where from
}

// Info describes a volume or a snapshot.
type Info struct {
	Name      string            `json:"name"`
	Kind      string            `json:"kind"` // "volume" or "snapshot"
	Size      int64             `json:"virtualSize"`
	Source    string            `json:"source,omitempty"`
	Created   time.Time         `json:"created"`
	Labels    map[string]string `json:"labels,omitempty"`
	Layers    []LayerInfo       `json:"layers"`         // bottom first
	Allocated int64             `json:"allocatedBytes"` // of the store's files (a base outside it is not counted)
}

// Volumes returns the names of all volumes, sorted.
func (s *Store) Volumes() ([]string, error) {
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	return sortedKeys(m.Volumes), nil
}

// Snapshots returns the names of all snapshots, sorted.
func (s *Store) Snapshots() ([]string, error) {
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	return sortedKeys(m.Snapshots), nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Info describes the volume or snapshot called name.
func (s *Store) Info(name string) (*Info, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	info := &Info{Name: name}
	var top string
	switch {
	case m.Volumes[name] != nil:
		v := m.Volumes[name]
		info.Kind, top, info.Created, info.Labels = "volume", v.Top, v.Created, v.Labels
	case m.Snapshots[name] != nil:
		sn := m.Snapshots[name]
		info.Kind, top, info.Created, info.Labels, info.Source = "snapshot", sn.Layer, sn.Created, sn.Labels, sn.Source
	default:
		return nil, fmt.Errorf("%s: %w", name, ErrNotFound)
	}
	ids, err := m.ancestry(top)
	if err != nil {
		return nil, err
	}
	info.Size = m.Layers[top].Size
	for _, id := range ids {
		l := m.Layers[id]
		li := LayerInfo{ID: id, State: l.State, Size: l.Size, Path: s.filePath(id, l), Opaque: l.Opaque, Origin: l.Origin}
		var st syscall.Stat_t
		if err := syscall.Stat(li.Path, &st); err == nil {
			li.Allocated = st.Blocks * 512
		}
		if l.inStore() {
			info.Allocated += li.Allocated
		}
		info.Layers = append(info.Layers, li)
	}
	return info, nil
}

// MapEntry says which layer serves a range of a chain's merged view.
type MapEntry struct {
	Off   int64  `json:"start"`
	Len   int64  `json:"length"`
	Layer string `json:"layer,omitempty"` // empty: no layer holds the range
	Depth int    `json:"depth"`           // 0 for the base or lowest layer; -1 for none
	Data  bool   `json:"data"`            // false: reads zero (a hole, or a zero-list entry)
}

// Map returns the merged view of an open chain as extents, in order, gaps included.
func (c *Chain) Map() []MapEntry {
	c.io.RLock()
	defer c.io.RUnlock()
	c.idxMu.RLock()
	defer c.idxMu.RUnlock()
	var out []MapEntry
	c.idx.each(0, c.size, func(s, e int64, st state, ok bool) bool {
		me := MapEntry{Off: s, Len: e - s, Depth: -1}
		if ok && st.cur != none {
			me.Depth = st.cur.layer()
			me.Layer = c.layers[me.Depth].id
			me.Data = st.cur.hasData()
		}
		out = append(out, me)
		return true
	})
	return out
}

// Allocated returns the ranges of a chain's merged view that hold data (everything else
// reads zero): what a backup of the chain must copy.
func (c *Chain) Allocated() []Extent {
	var out []Extent
	for _, me := range c.Map() {
		if me.Data {
			out = appendExtent(out, me.Off, me.Off+me.Len)
		}
	}
	return out
}

// Changed returns the ranges that may differ between two volumes or snapshots a and b:
// what the layers that are not shared by both chains hold (data or zero-list entries).
// When a is an ancestor snapshot of b, that is exactly what was written since a.
func (s *Store) Changed(a, b string) ([]Extent, error) {
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	ca, err := m.chainOf(a)
	if err != nil {
		return nil, err
	}
	cb, err := m.chainOf(b)
	if err != nil {
		return nil, err
	}
	ta, tb := ca[len(ca)-1], cb[len(cb)-1]
	if la, lb := m.Layers[ta], m.Layers[tb]; la.Opaque && lb.Opaque && la.Size == lb.Size {
		// Each side is one file: compare where their blocks lie (composed volumes and their
		// snapshots share every block neither rewrote).
		if out, err := s.changedBetweenFiles(ta, tb, la, lb); err == nil {
			return out, nil
		} else if !isUnsupported(err) {
			return nil, err
		}
	}
	common := 0
	for common < len(ca) && common < len(cb) && ca[common] == cb[common] {
		common++
	}
	// An opaque layer above the shared ones replaces them: what they hold may differ too.
	for _, id := range append(ca[common:], cb[common:]...) {
		if m.Layers[id].Opaque {
			common = 0
		}
	}
	size := max(m.Layers[ca[len(ca)-1]].Size, m.Layers[cb[len(cb)-1]].Size)
	var out []Extent
	for _, id := range append(ca[common:], cb[common:]...) {
		data, zeros, err := s.presence(id, m.Layers[id])
		if err != nil {
			return nil, err
		}
		out = union(out, union(data, zeros))
	}
	if ea, eb := m.Layers[ca[len(ca)-1]].Size, m.Layers[cb[len(cb)-1]].Size; ea != eb {
		// Growing changes what lies past the smaller size from "absent" to zeros.
		out = union(out, []Extent{{Off: min(ea, eb), Len: max(ea, eb) - min(ea, eb)}})
	}
	return clip(out, size), nil
}

// chainOf returns the layer ids of a volume or snapshot, bottom first.
func (m *manifest) chainOf(name string) ([]string, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	switch {
	case m.Volumes[name] != nil:
		return m.ancestry(m.Volumes[name].Top)
	case m.Snapshots[name] != nil:
		return m.ancestry(m.Snapshots[name].Layer)
	}
	return nil, fmt.Errorf("%s: %w", name, ErrNotFound)
}

// OpenName opens a volume (read-only) or a snapshot by name.
func (s *Store) OpenName(name string) (*Chain, error) {
	c, err := s.OpenSnapshot(name)
	if errors.Is(err, ErrNotFound) {
		return s.Open(name, OpenOptions{ReadOnly: true})
	}
	return c, err
}

// Export writes the merged view of a volume or snapshot to dst as a plain sparse raw file:
// holes where the view reads zero, data copied with copy_file_range (a reflink on xfs and
// btrfs). dst must not exist. progress, if set, is told the bytes copied so far of total.
func (s *Store) Export(name, dst string, progress func(done, total int64)) error {
	c, err := s.OpenName(name)
	if err != nil {
		return err
	}
	defer c.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("export %s: %w", name, err)
	}
	ok := false
	defer func() {
		out.Close()
		if !ok {
			os.Remove(dst)
		}
	}()
	if err := out.Truncate(c.Size()); err != nil {
		return fmt.Errorf("export %s: %w", name, err)
	}
	entries := c.Map()
	var total, done int64
	for _, me := range entries {
		if me.Data {
			total += me.Len
		}
	}
	for _, me := range entries {
		if !me.Data {
			continue
		}
		// A base may end before the volume does; what lies past its end reads zero.
		in := c.layers[me.Depth].f
		n := min(me.Len, max(0, c.layers[me.Depth].meta.Size-me.Off))
		if err := copyRange(out, in, me.Off, n, func(k int64) {
			done += k
			if progress != nil {
				progress(done, total)
			}
		}); err != nil {
			return fmt.Errorf("export %s: %w", name, err)
		}
	}
	if err := out.Sync(); err != nil {
		return fmt.Errorf("export %s: %w", name, err)
	}
	ok = true
	return nil
}

// Problem is one finding of Check.
type Problem struct {
	Subject string `json:"subject"` // a volume, snapshot, layer id or file name
	Message string `json:"message"`
}

func (p Problem) String() string { return p.Subject + ": " + p.Message }

// Check verifies the store: the manifest parses; every chain resolves without cycles;
// every layer file exists with the size the manifest gives; bases are unchanged; zero lists
// parse; every layer is used; no file lies in layers/ that the manifest does not name. A base
// copied into the store is checked like a base, in its file layers/ID.raw; its origin is
// not looked at (nothing reads it any more, and it may be gone).
// With repair, unused layers and stray files are removed (nothing in use is touched).
// The trash (DIR/.trash) is not looked at: what lies there is freed already, and being
// unlinked.
func (s *Store) Check(repair bool) ([]Problem, error) {
	if repair {
		// A store too damaged to collect in still gets its problems listed below.
		if err := s.Collect(); err != nil && !errors.Is(err, ErrCorrupt) {
			return nil, err
		}
	}
	m, release, err := s.read()
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			return []Problem{{Subject: "manifest.json", Message: err.Error()}}, nil
		}
		return nil, err
	}
	defer release()
	var probs []Problem
	add := func(subject, format string, args ...any) {
		probs = append(probs, Problem{Subject: subject, Message: fmt.Sprintf(format, args...)})
	}
	used := map[string]bool{}
	activeUsers := map[string]int{}
	walk := func(kind, name, top string) {
		ids, err := m.ancestry(top)
		if err != nil {
			add(kind+" "+name, "%v", err)
			return
		}
		for i, id := range ids {
			used[id] = true
			st := m.Layers[id].State
			switch {
			case i > 0 && st == Base:
				add(kind+" "+name, "base layer %s is not at the bottom of the chain", id)
			case i < len(ids)-1 && st == Active:
				add(kind+" "+name, "active layer %s is below the top", id)
			}
		}
		if kind == "volume" {
			if m.Layers[top].State != Active {
				add("volume "+name, "top layer %s is %s, not active", top, m.Layers[top].State)
			}
			activeUsers[top]++
		} else if m.Layers[top].State != Frozen {
			add("snapshot "+name, "layer %s is %s, not frozen", top, m.Layers[top].State)
		}
	}
	for _, name := range sortedKeys(m.Volumes) {
		walk("volume", name, m.Volumes[name].Top)
	}
	for _, name := range sortedKeys(m.Snapshots) {
		walk("snapshot", name, m.Snapshots[name].Layer)
	}
	for _, id := range sortedKeys(m.Layers) {
		l := m.Layers[id]
		if !used[id] {
			add("layer "+id, "no volume or snapshot uses it")
		}
		if l.State == Active && activeUsers[id] != 1 {
			add("layer "+id, "active layer is the top of %d volumes", activeUsers[id])
		}
		path := s.filePath(id, l)
		fi, err := os.Stat(path)
		switch {
		case err != nil:
			add("layer "+id, "%v", err)
			continue
		case !fi.Mode().IsRegular():
			add("layer "+id, "%s is not a regular file", path)
		case fi.Size() != l.Size:
			add("layer "+id, "%s has %d bytes, the manifest says %d", path, fi.Size(), l.Size)
		case l.State == Base && fi.ModTime().UnixNano() != l.MTime:
			add("layer "+id, "base %s was modified after chains were built on it", path)
		}
		if l.State != Base {
			if _, err := readZeroList(s.zeroPath(id), l.Size); err != nil {
				add("layer "+id, "%v", err)
			}
		}
	}
	entries, err := os.ReadDir(filepath.Join(s.dir, "layers"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("check: %w", err)
	}
	for _, e := range entries {
		id, _, _ := strings.Cut(e.Name(), ".")
		if strings.HasPrefix(e.Name(), ".") {
			// The temp file of an atomic write: a live chain may be writing its zero list,
			// or a crash left it; like removeUnlisted, count it only once it is old.
			if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < time.Hour {
				continue
			}
		}
		if l := m.Layers[id]; l == nil || !l.inStore() {
			add("layers/"+e.Name(), "stray file: no layer of the manifest")
		}
	}
	return probs, nil
}

// DataExtents returns the ranges of f below size that hold written data, as the engine sees
// a layer: unwritten extents and holes are absent.
func DataExtents(f *os.File, size int64) ([]Extent, error) { return dataExtents(f, size) }

// CopyRange copies n bytes at off from in to the same offset of out, with copy_file_range
// where the kernel can. progress, if set, is told of every chunk copied.
func CopyRange(out, in *os.File, off, n int64, progress func(int64)) error {
	return copyRange(out, in, off, n, progress)
}

// baseUsers returns the volumes and snapshots whose chains rest on the base file at path. A
// base copied into the store reads its copy, not its origin: its chains are no users of
// the origin.
func (m *manifest) baseUsers(path string) []string {
	var users []string
	for _, kind := range []map[string]string{m.volumeTops(), m.snapshotLayers()} {
		for _, name := range sortedKeys(kind) {
			ids, err := m.ancestry(kind[name])
			if err == nil && len(ids) > 0 {
				if b := m.Layers[ids[0]]; b.State == Base && b.Path == path {
					users = append(users, name)
				}
			}
		}
	}
	return users
}

func (m *manifest) volumeTops() map[string]string {
	out := make(map[string]string, len(m.Volumes))
	for name, v := range m.Volumes {
		out[name] = v.Top
	}
	return out
}

func (m *manifest) snapshotLayers() map[string]string {
	out := make(map[string]string, len(m.Snapshots))
	for name, sn := range m.Snapshots {
		out[name] = sn.Layer
	}
	return out
}

// BaseUsers returns the volumes and snapshots that read the base file at path. Those over a
// base copied into the store (LocalizeBase) read the copy: the file they were copied from
// has no users any more.
func (s *Store) BaseUsers(path string) ([]string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	m, release, err := s.read()
	if err != nil {
		return nil, err
	}
	defer release()
	return m.baseUsers(abs), nil
}

// RemoveBase deletes the base file at path unless a chain rests on it. It holds the store's
// lock throughout, so no volume can be created on the file meanwhile. The origin of a base
// copied into the store may go (its chains read the copy); a file of the store never does
// (a copied base is freed with its last chain, like a layer).
func (s *Store) RemoveBase(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if rel, err := filepath.Rel(s.dir, abs); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		return fmt.Errorf("remove %s: %w: a file of the store is no base to remove", path, ErrInvalidName)
	}
	return s.tx(func(m *manifest) error {
		if users := m.baseUsers(abs); len(users) > 0 {
			return fmt.Errorf("%s: %w: used by %s", path, ErrBusy, strings.Join(users, ", "))
		}
		if err := os.Remove(abs); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", path, err)
		}
		return nil
	})
}

// SetLabels changes labels of a volume or snapshot: each key of set gets its value, or is
// removed when the value is empty.
func (s *Store) SetLabels(name string, set map[string]string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	return s.tx(func(m *manifest) error {
		var labels *map[string]string
		switch {
		case m.Volumes[name] != nil:
			labels = &m.Volumes[name].Labels
		case m.Snapshots[name] != nil:
			labels = &m.Snapshots[name].Labels
		default:
			return fmt.Errorf("%s: %w", name, ErrNotFound)
		}
		if *labels == nil {
			*labels = map[string]string{}
		}
		for k, v := range set {
			if v == "" {
				delete(*labels, k)
			} else {
				(*labels)[k] = v
			}
		}
		return nil
	})
}
