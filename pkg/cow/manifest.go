package cow

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

// formatVersion is the manifest format this code writes and reads.
const formatVersion = 1

// LayerState is where a layer stands in its chains.
type LayerState string

const (
	// Active: the writable top of exactly one volume.
	Active LayerState = "active"
	// Frozen: immutable for good; may back several chains.
	Frozen LayerState = "frozen"
	// Base: a read-only raw file outside the layers directory; never modified, never deleted.
	// A base copied into the store (LocalizeBase) lies in the layers directory, and is freed
	// with its last chain like any layer.
	Base LayerState = "base"
)

// LayerMeta is one layer's entry in the manifest.
type LayerMeta struct {
	Parent string     `json:"parent,omitempty"`
	Size   int64      `json:"size"`
	State  LayerState `json:"state"`
	// Path and MTime describe a base: its absolute path and its modification time (ns),
	// so that a base changed behind our back is refused instead of served.
	Path  string `json:"path,omitempty"`
	MTime int64  `json:"mtimeNs,omitempty"`
	// Origin and OriginMTime describe a base copied into the store (see LocalizeBase): the
	// file it was copied from and that file's modification time then. Such a base has no
	// Path: its file is layers/ID.raw, found by its id like any layer's (so the store stays
	// movable), and MTime is the copy's. An older build refuses the field instead of taking
	// the copy for a stray file.
	Origin      string `json:"origin,omitempty"`
	OriginMTime int64  `json:"originMtimeNs,omitempty"`
	// Opaque: the layer holds the whole view of its chain; its holes read zero and hide
	// every layer below (a composed top, or a snapshot of one).
	Opaque bool `json:"opaque,omitempty"`
}

// VolumeMeta names a writable chain by its top layer.
type VolumeMeta struct {
	Top     string            `json:"top"`
	Created time.Time         `json:"created"`
	Labels  map[string]string `json:"labels,omitempty"`
}

// SnapshotMeta names a frozen layer, the top of a read-only chain.
type SnapshotMeta struct {
	Layer   string            `json:"layer"`
	Source  string            `json:"source,omitempty"` // the volume it was taken of
	Created time.Time         `json:"created"`
	Labels  map[string]string `json:"labels,omitempty"`
}

// manifest is the whole chain metadata of a store. It is small (a few hundred bytes per
// layer) and replaced atomically as one file, so every operation commits in one rename.
type manifest struct {
	Format    int                      `json:"format"`
	Layers    map[string]*LayerMeta    `json:"layers"`
	Volumes   map[string]*VolumeMeta   `json:"volumes"`
	Snapshots map[string]*SnapshotMeta `json:"snapshots"`

	unwritten bool // read from a store that has no manifest file yet
}

// inStore reports whether the layer's file is the store's (layers/ID.raw): every layer but
// a base that was not copied into the store.
func (l *LayerMeta) inStore() bool { return l.State != Base || l.Origin != "" }

func newManifest() *manifest {
	return &manifest{
		Format:    formatVersion,
		Layers:    map[string]*LayerMeta{},
		Volumes:   map[string]*VolumeMeta{},
		Snapshots: map[string]*SnapshotMeta{},
	}
}

func readManifest(path string) (*manifest, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		// A new store has no manifest; a store with layers but no manifest has lost it, and
		// reading it as empty would let the next change delete every layer.
		if layers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "layers", "*.raw")); len(layers) > 0 {
			return nil, fmt.Errorf("%w: %s is missing but layers/ holds %d layer files", ErrCorrupt, path, len(layers))
		}
		m := newManifest()
		m.unwritten = true
		return m, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	m := newManifest()
	m.Format = 0 // a manifest without a format is not one this build wrote
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(m); err != nil {
		return nil, fmt.Errorf("%w: manifest %s: %v", ErrCorrupt, path, err)
	}
	if m.Format != formatVersion {
		return nil, fmt.Errorf("%w: manifest %s has format %d, this build reads %d", ErrCorrupt, path, m.Format, formatVersion)
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("%w: manifest %s: %v", ErrCorrupt, path, err)
	}
	return m, nil
}

// validate checks what every later path computation relies on: ids of the right shape,
// references that resolve, parent links without cycles (a dangling reference would make
// operations dereference a missing entry, and removeUnlisted delete a needed file). Sizes
// are Check's business and are caught at open.
func (m *manifest) validate() error {
	if m.Layers == nil || m.Volumes == nil || m.Snapshots == nil {
		return errors.New("missing layers, volumes or snapshots")
	}
	for id, l := range m.Layers {
		if !validLayerID(id) {
			return fmt.Errorf("bad layer id %q", id)
		}
		if l == nil {
			return fmt.Errorf("layer %s: empty entry", id)
		}
		if l.Parent != "" && !validLayerID(l.Parent) {
			return fmt.Errorf("layer %s: bad parent id %q", id, l.Parent)
		}
		if l.Size < 0 {
			return fmt.Errorf("layer %s: negative size", id)
		}
		switch l.State {
		case Active, Frozen:
			if l.Path != "" || l.Origin != "" {
				return fmt.Errorf("layer %s: only a base has a path or an origin", id)
			}
		case Base:
			if l.Origin != "" && (l.Path != "" || !filepath.IsAbs(l.Origin) || l.Parent != "") {
				return fmt.Errorf("layer %s: a base copied into the store needs an absolute origin, no path and no parent", id)
			}
			if l.Origin == "" && (!filepath.IsAbs(l.Path) || l.Parent != "") {
				return fmt.Errorf("layer %s: a base needs an absolute path and no parent", id)
			}
		default:
			return fmt.Errorf("layer %s: unknown state %q", id, l.State)
		}
	}
	for name, v := range m.Volumes {
		if err := ValidateName(name); err != nil {
			return err
		}
		if v == nil || !validLayerID(v.Top) {
			return fmt.Errorf("volume %s: bad top", name)
		}
		if m.Layers[v.Top] == nil {
			return fmt.Errorf("volume %s: top layer %s is missing", name, v.Top)
		}
	}
	for name, s := range m.Snapshots {
		if err := ValidateName(name); err != nil {
			return err
		}
		if s == nil || !validLayerID(s.Layer) {
			return fmt.Errorf("snapshot %s: bad layer", name)
		}
		if m.Layers[s.Layer] == nil {
			return fmt.Errorf("snapshot %s: layer %s is missing", name, s.Layer)
		}
	}
	for id, l := range m.Layers {
		if l.Parent != "" && m.Layers[l.Parent] == nil {
			return fmt.Errorf("layer %s: parent layer %s is missing", id, l.Parent)
		}
	}
	done := map[string]bool{} // layers whose ancestry is known to end
	for id := range m.Layers {
		var path []string
		onPath := map[string]bool{}
		for x := id; x != "" && !done[x]; x = m.Layers[x].Parent {
			if onPath[x] {
				return fmt.Errorf("parent links of layer %s form a cycle", x)
			}
			onPath[x] = true
			path = append(path, x)
		}
		for _, x := range path {
			done[x] = true
		}
	}
	return nil
}

// writeFileAtomic replaces path with data: temp file, fsync, rename, fsync of the directory.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("fsync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename %s: %w", path, err)
	}
	if err := syncDir(dir); err != nil {
		return &committedError{err: err} // the new content is in place
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	return nil
}

func (m *manifest) write(path string) error {
	data, err := json.MarshalIndent(m, "", " ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	return writeFileAtomic(path, append(data, '\n'))
}

// children maps each layer id to the ids of the layers whose parent it is, sorted.
func (m *manifest) children() map[string][]string {
	kids := map[string][]string{}
	for id, l := range m.Layers {
		if l.Parent != "" {
			kids[l.Parent] = append(kids[l.Parent], id)
		}
	}
	for _, k := range kids {
		sort.Strings(k)
	}
	return kids
}

// snapshotsOf maps each layer id to the snapshot names that point at it.
func (m *manifest) snapshotsOf() map[string][]string {
	names := map[string][]string{}
	for name, s := range m.Snapshots {
		names[s.Layer] = append(names[s.Layer], name)
	}
	return names
}

// ancestry returns the chain ending at top, bottom first. It fails on a missing layer
// or a cycle, so a damaged manifest can never make an endless walk.
func (m *manifest) ancestry(top string) ([]string, error) {
	var ids []string
	seen := map[string]bool{}
	for id := top; id != ""; id = m.Layers[id].Parent {
		if seen[id] {
			return nil, fmt.Errorf("%w: parent links of layer %s form a cycle", ErrCorrupt, top)
		}
		seen[id] = true
		if m.Layers[id] == nil {
			return nil, fmt.Errorf("%w: layer %s is missing from the manifest", ErrCorrupt, id)
		}
		ids = append(ids, id)
	}
	for i, j := 0, len(ids)-1; i < j; i, j = i+1, j-1 {
		ids[i], ids[j] = ids[j], ids[i]
	}
	return ids, nil
}

// flock takes an advisory lock on f; LOCK_NB makes it fail with ErrBusy instead of waiting.
func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EWOULDBLOCK {
			return ErrBusy
		}
		if err != nil {
			return fmt.Errorf("flock %s: %w", f.Name(), err)
		}
		return nil
	}
}
