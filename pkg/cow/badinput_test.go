package cow_test

// Bad input: damaged stores, bad names, bad bases. Every refusal must be a clear error
// that wraps the engine's sentinel, and must leave the store exactly as it was.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// storeState describes every file of a store but its lock files: name, size, sha256.
type storeState map[string]string

func storeStateOf(t *testing.T, dir string, withLocks bool) storeState {
	t.Helper()
	st := storeState{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if !withLocks && (rel == ".lock" || rel == "locks" || strings.HasPrefix(rel, "locks/")) {
			return nil
		}
		if d.IsDir() {
			st[rel] = "dir"
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		st[rel] = fmt.Sprintf("%d %s", len(data), hex.EncodeToString(sum[:8]))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func assertSameState(t *testing.T, dir string, before storeState) {
	t.Helper()
	assertSameStateOf(t, dir, before, false)
}

func assertSameStateOf(t *testing.T, dir string, before storeState, withLocks bool) {
	t.Helper()
	after := storeStateOf(t, dir, withLocks)
	var diffs []string
	for k, v := range before {
		if after[k] != v {
			diffs = append(diffs, fmt.Sprintf("%s: %q -> %q", k, v, after[k]))
		}
	}
	for k, v := range after {
		if _, ok := before[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: new %q", k, v))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		t.Errorf("the store changed:\n  %s", strings.Join(diffs, "\n  "))
	}
}

// badFixture is a store with every kind of layer and a zero list in a frozen layer and
// in a top:
//
//	base <- F (snapshot "snap", zero list) <- T (volume "vol", zero list)
//	                                      <- C (volume "clone")
//	O (volume "other", no base)
type badFixture struct {
	dir, base string
	st        *cow.Store
	F, T, C   string // layer ids
}

func newBadFixture(t *testing.T) *badFixture {
	t.Helper()
	dir := t.TempDir()
	fx := &badFixture{dir: dir, base: filepath.Join(dir, "base.raw")}
	writeSparse(t, fx.base, ccBase()[:16*bs])
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	fx.st = st
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(st.Create("vol", cow.CreateOptions{Base: fx.base}))
	c, err := st.Open("vol", cow.OpenOptions{})
	must(err)
	p := bytes.Repeat([]byte{0x42}, 2*bs)
	_, err = c.WriteAt(p, 1*bs)
	must(err)
	must(c.Discard(4*bs, bs)) // over base data: a zero list
	must(c.Snapshot("snap", nil))
	_, err = c.WriteAt(p[:bs], 5*bs)
	must(err)
	must(c.Discard(7*bs, 2*bs))
	must(c.Close())
	must(st.Clone("snap", "clone", nil))
	must(st.Create("other", cow.CreateOptions{Size: 8 * bs}))
	c, err = st.Open("other", cow.OpenOptions{})
	must(err)
	_, err = c.WriteAt(p, 0)
	must(err)
	must(c.Close())
	layers := func(name string) []cow.LayerInfo {
		info, err := st.Info(name)
		must(err)
		return info.Layers
	}
	vl, cl := layers("vol"), layers("clone")
	if len(vl) != 3 || len(cl) != 3 || vl[1].ID != cl[1].ID {
		t.Fatalf("unexpected fixture layout: vol %v, clone %v", vl, cl)
	}
	fx.F, fx.T, fx.C = vl[1].ID, vl[2].ID, cl[2].ID
	for _, id := range []string{fx.F, fx.T} {
		if _, err := os.Stat(fx.zeroPath(id)); err != nil {
			t.Fatalf("fixture: layer %s has no zero list: %v", id, err)
		}
	}
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		t.Fatalf("fixture: check: %v %v", err, probs)
	}
	return fx
}

func (fx *badFixture) layerPath(id string) string {
	return filepath.Join(fx.st.Dir(), "layers", id+".raw")
}
func (fx *badFixture) zeroPath(id string) string {
	return filepath.Join(fx.st.Dir(), "layers", id+".zero")
}
func (fx *badFixture) manifestPath() string { return filepath.Join(fx.st.Dir(), "manifest.json") }

// editManifest rewrites manifest.json by hand, as an operator or a bug might.
func (fx *badFixture) editManifest(t *testing.T, edit func(m map[string]any)) {
	t.Helper()
	editManifestFile(t, fx.manifestPath(), edit)
}

func editManifestFile(t *testing.T, path string, edit func(m map[string]any)) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber() // mtimeNs does not fit a float64
	if err := dec.Decode(&m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	if data, err = json.MarshalIndent(m, "", " "); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func layerEntry(m map[string]any, id string) map[string]any {
	return m["layers"].(map[string]any)[id].(map[string]any)
}

// badOp is one call that must fail with want.
type badOp struct {
	name string
	call func() error
	want error
}

// allOps is every Store call on the fixture's names; with a damaged manifest every one of
// them must fail.
func (fx *badFixture) allOps(t *testing.T, want error) []badOp {
	st := fx.st
	open := func(name string, ro bool) func() error {
		return func() error {
			c, err := st.Open(name, cow.OpenOptions{ReadOnly: ro})
			if err == nil {
				c.Close()
			}
			return err
		}
	}
	dst := filepath.Join(fx.dir, "export.raw")
	return []badOp{
		{"Open(vol)", open("vol", false), want},
		{"Open(vol, ro)", open("vol", true), want},
		{"Open(clone)", open("clone", false), want},
		{"Open(other)", open("other", false), want},
		{"OpenSnapshot(snap)", func() error { c, err := st.OpenSnapshot("snap"); closeIf(c, err); return err }, want},
		{"OpenName(vol)", func() error { c, err := st.OpenName("vol"); closeIf(c, err); return err }, want},
		{"Info(vol)", func() error { _, err := st.Info("vol"); return err }, want},
		{"Info(snap)", func() error { _, err := st.Info("snap"); return err }, want},
		{"Volumes", func() error { _, err := st.Volumes(); return err }, want},
		{"Snapshots", func() error { _, err := st.Snapshots(); return err }, want},
		{"Changed(snap, vol)", func() error { _, err := st.Changed("snap", "vol"); return err }, want},
		{"Export(vol)", func() error { return st.Export("vol", dst, nil) }, want},
		{"Export(snap)", func() error { return st.Export("snap", dst, nil) }, want},
		{"Create(new)", func() error { return st.Create("new", cow.CreateOptions{Size: 4 * bs}) }, want},
		{"Create(new, base)", func() error { return st.Create("new", cow.CreateOptions{Base: fx.base}) }, want},
		{"Snapshot(vol)", func() error { return st.Snapshot("vol", "snap2", nil) }, want},
		{"Snapshot(other)", func() error { return st.Snapshot("other", "snap2", nil) }, want},
		{"SnapshotGroup(vol, other)", func() error {
			return st.SnapshotGroup([]string{"vol", "other"}, []string{"g1", "g2"}, nil)
		}, want},
		{"Clone(snap)", func() error { return st.Clone("snap", "new", nil) }, want},
		{"Clone(vol)", func() error { return st.Clone("vol", "new", nil) }, want},
		{"Resize(vol)", func() error { return st.Resize("vol", 32*bs) }, want},
		{"Resize(other)", func() error { return st.Resize("other", 32*bs) }, want},
		{"DeleteVolume(other)", func() error { return st.DeleteVolume("other") }, want},
		{"DeleteVolume(clone)", func() error { return st.DeleteVolume("clone") }, want},
		{"DeleteSnapshot(snap)", func() error { return st.DeleteSnapshot("snap") }, want},
		{"Collect", st.Collect, want},
	}
}

func closeIf(c *cow.Chain, err error) {
	if err == nil {
		c.Close()
	}
}

// expectRefused runs ops on a damaged store: each must fail with its sentinel and a
// message that names mention; afterwards nothing in the store may have changed, no
// export file may exist, and Check(false) must report the damage.
func (fx *badFixture) expectRefused(t *testing.T, ops []badOp, mention string) {
	t.Helper()
	before := storeStateOf(t, fx.st.Dir(), false)
	baseBefore, err := os.Stat(fx.base)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	for _, op := range ops {
		err := op.call()
		switch {
		case err == nil:
			t.Errorf("%s succeeded on a damaged store", op.name)
		case !errors.Is(err, op.want):
			t.Errorf("%s: got %v, want an error wrapping %q", op.name, err, op.want)
		case mention != "" && !strings.Contains(err.Error(), mention):
			t.Errorf("%s: error %q does not mention %q", op.name, err, mention)
		}
	}
	assertSameState(t, fx.st.Dir(), before)
	if _, err := os.Stat(filepath.Join(fx.dir, "export.raw")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("an export file was left behind: %v", err)
	}
	if baseBefore != nil {
		if fi, err := os.Stat(fx.base); err != nil || !fi.ModTime().Equal(baseBefore.ModTime()) || fi.Size() != baseBefore.Size() {
			t.Errorf("the base changed: %v", err)
		}
	}
	probs, err := fx.st.Check(false)
	if err != nil {
		t.Errorf("check: %v", err)
	} else if len(probs) == 0 {
		t.Errorf("check reports no problem on a damaged store")
	} else {
		t.Logf("check: %v", probs)
	}
	assertSameState(t, fx.st.Dir(), before)
}

// TestBadManifest damages manifest.json in every way the brief lists: every Store call
// is refused with ErrCorrupt and nothing changes.
func TestBadManifest(t *testing.T) {
	cases := []struct {
		name    string
		damage  func(t *testing.T, fx *badFixture)
		mention any // a string, or func(*badFixture) string
	}{
		{"garbage", func(t *testing.T, fx *badFixture) {
			os.WriteFile(fx.manifestPath(), []byte("\x00\x01garbage{{{"), 0o600)
		}, "manifest"},
		{"empty file", func(t *testing.T, fx *badFixture) {
			os.WriteFile(fx.manifestPath(), nil, 0o600)
		}, "manifest"},
		{"truncated JSON", func(t *testing.T, fx *badFixture) {
			data, _ := os.ReadFile(fx.manifestPath())
			os.WriteFile(fx.manifestPath(), data[:len(data)/2], 0o600)
		}, "manifest"},
		{"unknown field", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { m["compression"] = "zstd" })
		}, "manifest"},
		{"unknown layer field", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { layerEntry(m, fx.T)["compressionLevel"] = 9 })
		}, "manifest"},
		{"format 2", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { m["format"] = 2 })
		}, "format"},
		{"format missing", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { delete(m, "format") })
		}, "format"},
		{"layer id ../x", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) {
				ls := m["layers"].(map[string]any)
				ls["../x"] = ls[fx.T]
				delete(ls, fx.T)
				m["volumes"].(map[string]any)["vol"].(map[string]any)["top"] = "../x"
			})
		}, "../x"},
		{"parent ../x", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { layerEntry(m, fx.T)["parent"] = "../../etc" })
		}, "../../etc"},
		{"unknown state", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { layerEntry(m, fx.T)["state"] = "melted" })
		}, "melted"},
		{"negative size", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { layerEntry(m, fx.F)["size"] = -4096 })
		}, "size"},
		{"relative base path", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) {
				for _, l := range m["layers"].(map[string]any) {
					if l := l.(map[string]any); l["state"] == "base" {
						l["path"] = "base.raw"
					}
				}
			})
		}, "base"},
		{"volume name with a slash", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) {
				vs := m["volumes"].(map[string]any)
				vs["../../x"] = vs["other"]
			})
		}, "invalid name"},
		{"missing parent entry", func(t *testing.T, fx *badFixture) {
			// T's and C's parent (and snap's layer) F is gone from the manifest; its file stays.
			fx.editManifest(t, func(m map[string]any) { delete(m["layers"].(map[string]any), fx.F) })
		}, func(fx *badFixture) string { return fx.F }},
		{"missing top entry", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { delete(m["layers"].(map[string]any), fx.T) })
		}, func(fx *badFixture) string { return fx.T }},
		{"cycle of parents", func(t *testing.T, fx *badFixture) {
			// T -> F -> T: the base drops out of the chain.
			fx.editManifest(t, func(m map[string]any) { layerEntry(m, fx.F)["parent"] = fx.T })
		}, "cycle"},
		{"self parent", func(t *testing.T, fx *badFixture) {
			fx.editManifest(t, func(m map[string]any) { layerEntry(m, fx.T)["parent"] = fx.T })
		}, "cycle"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fx := newBadFixture(t)
			tc.damage(t, fx)
			mention, _ := tc.mention.(string)
			if f, ok := tc.mention.(func(*badFixture) string); ok {
				mention = f(fx)
			}
			fx.expectRefused(t, fx.allOps(t, cow.ErrCorrupt), mention)
			// Repair cannot repair a manifest: it lists the problem and changes nothing.
			before := storeStateOf(t, fx.st.Dir(), false)
			if probs, err := fx.st.Check(true); err != nil || len(probs) == 0 {
				t.Errorf("check(repair): %v, %v; want the problem listed", probs, err)
			}
			assertSameState(t, fx.st.Dir(), before)
			// The layer files a damaged manifest no longer names are still there.
			for _, id := range []string{fx.F, fx.T, fx.C} {
				if _, err := os.Stat(fx.layerPath(id)); err != nil {
					t.Errorf("layer %s: %v", id, err)
				}
			}
		})
	}
}

// TestBadLayerFiles damages layer files: missing, of the wrong size, a bad zero list.
// Every call that needs the damaged layer is refused with ErrCorrupt; nothing changes.
func TestBadLayerFiles(t *testing.T) {
	opener := func(fx *badFixture, name string, ro bool) badOp {
		return badOp{fmt.Sprintf("Open(%s, ro=%v)", name, ro), func() error {
			c, err := fx.st.Open(name, cow.OpenOptions{ReadOnly: ro})
			closeIf(c, err)
			return err
		}, cow.ErrCorrupt}
	}
	snapOpener := func(fx *badFixture) badOp {
		return badOp{"OpenSnapshot(snap)", func() error { c, err := fx.st.OpenSnapshot("snap"); closeIf(c, err); return err }, cow.ErrCorrupt}
	}
	exporter := func(fx *badFixture, name string) badOp {
		return badOp{"Export(" + name + ")", func() error { return fx.st.Export(name, filepath.Join(fx.dir, "export.raw"), nil) }, cow.ErrCorrupt}
	}
	// Calls that read the frozen layer F.
	frozenOps := func(fx *badFixture) []badOp {
		return []badOp{opener(fx, "vol", false), opener(fx, "vol", true), opener(fx, "clone", false), snapOpener(fx),
			exporter(fx, "snap"), exporter(fx, "clone")}
	}
	// Calls that read the top T.
	topOps := func(fx *badFixture) []badOp {
		return []badOp{opener(fx, "vol", false), opener(fx, "vol", true), exporter(fx, "vol")}
	}
	resize := func(path string, delta int64) func(t *testing.T, fx *badFixture) {
		return func(t *testing.T, fx *badFixture) {
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, fi.Size()+delta); err != nil {
				t.Fatal(err)
			}
		}
	}
	write := func(data string) func(string) func(t *testing.T, fx *badFixture) {
		return func(path string) func(t *testing.T, fx *badFixture) {
			return func(t *testing.T, fx *badFixture) {
				if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	badZeroLists := map[string]string{
		"garbage":       "\xff\xfe not json",
		"truncated":     `{"format":1,"ranges":[[16384,4`,
		"format 2":      `{"format":2,"ranges":[[16384,4096]]}`,
		"unknown field": `{"format":1,"ranges":[[16384,4096]],"extra":1}`,
		"unsorted":      `{"format":1,"ranges":[[28672,4096],[16384,4096]]}`,
		"overlapping":   `{"format":1,"ranges":[[16384,8192],[20480,4096]]}`,
		"past the end":  `{"format":1,"ranges":[[16384,1099511627776]]}`,
		"empty range":   `{"format":1,"ranges":[[16384,0]]}`,
		"negative":      `{"format":1,"ranges":[[-4096,8192]]}`,
		"overflow":      `{"format":1,"ranges":[[9223372036854771712,9223372036854771712]]}`,
	}
	type tcase struct {
		name   string
		damage func(t *testing.T, fx *badFixture)
		ops    func(fx *badFixture) []badOp
		layer  func(fx *badFixture) string // the id the errors must mention
	}
	idF := func(fx *badFixture) string { return fx.F }
	idT := func(fx *badFixture) string { return fx.T }
	cases := []tcase{
		{"frozen layer missing", func(t *testing.T, fx *badFixture) { os.Remove(fx.layerPath(fx.F)) }, frozenOps, idF},
		{"top missing", func(t *testing.T, fx *badFixture) { os.Remove(fx.layerPath(fx.T)) }, topOps, idT},
		{"frozen layer shorter", func(t *testing.T, fx *badFixture) { resize(fx.layerPath(fx.F), -bs)(t, fx) }, frozenOps, idF},
		{"frozen layer longer", func(t *testing.T, fx *badFixture) { resize(fx.layerPath(fx.F), bs)(t, fx) }, frozenOps, idF},
		{"frozen layer 1 byte longer", func(t *testing.T, fx *badFixture) { resize(fx.layerPath(fx.F), 1)(t, fx) }, frozenOps, idF},
		{"top longer", func(t *testing.T, fx *badFixture) { resize(fx.layerPath(fx.T), bs)(t, fx) }, topOps, idT},
		{"frozen layer is a directory", func(t *testing.T, fx *badFixture) {
			os.Remove(fx.layerPath(fx.F))
			os.Mkdir(fx.layerPath(fx.F), 0o700)
		}, frozenOps, idF},
	}
	for name, data := range badZeroLists {
		cases = append(cases,
			tcase{"top zero list " + name, func(t *testing.T, fx *badFixture) { write(data)(fx.zeroPath(fx.T))(t, fx) }, topOps, idT},
			tcase{"frozen zero list " + name, func(t *testing.T, fx *badFixture) { write(data)(fx.zeroPath(fx.F))(t, fx) }, frozenOps, idF})
	}
	sort.Slice(cases, func(i, j int) bool { return cases[i].name < cases[j].name })
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fx := newBadFixture(t)
			tc.damage(t, fx)
			fx.expectRefused(t, tc.ops(fx), tc.layer(fx))
		})
	}
}

// TestBadBase: a base that is a directory, missing, inside the store, or modified after
// volumes were built on it.
func TestBadBase(t *testing.T) {
	t.Run("create", func(t *testing.T) {
		fx := newBadFixture(t)
		dirBase := filepath.Join(fx.dir, "adir")
		os.Mkdir(dirBase, 0o700)
		before := storeStateOf(t, fx.st.Dir(), true)
		for _, tc := range []struct {
			base string
			want error
		}{
			{dirBase, cow.ErrNotSupported},
			{filepath.Join(fx.dir, "missing.raw"), cow.ErrNotFound},
			{fx.layerPath(fx.F), cow.ErrInvalidName},                 // a layer of the store
			{"/dev/null", cow.ErrNotSupported},                       // not a regular file
			{filepath.Join(fx.dir, "missing", "x"), cow.ErrNotFound}, // missing directory
		} {
			err := fx.st.Create("new", cow.CreateOptions{Base: tc.base})
			if !errors.Is(err, tc.want) {
				t.Errorf("create over base %s: got %v, want %v", tc.base, err, tc.want)
			} else if !strings.Contains(err.Error(), tc.base) {
				t.Errorf("create over base %s: error %q does not name the base", tc.base, err)
			}
		}
		// A size smaller than the base, and no size without a base.
		if err := fx.st.Create("new", cow.CreateOptions{Base: fx.base, Size: bs}); !errors.Is(err, cow.ErrInvalidSize) {
			t.Errorf("create smaller than the base: got %v, want ErrInvalidSize", err)
		}
		if err := fx.st.Create("new", cow.CreateOptions{}); !errors.Is(err, cow.ErrInvalidSize) {
			t.Errorf("create without size or base: got %v, want ErrInvalidSize", err)
		}
		if err := fx.st.Create("new", cow.CreateOptions{Size: -1}); !errors.Is(err, cow.ErrInvalidSize) {
			t.Errorf("create with a negative size: got %v, want ErrInvalidSize", err)
		}
		assertSameStateOf(t, fx.st.Dir(), before, true)
	})

	baseOps := func(fx *badFixture, want error) []badOp {
		ops := []badOp{}
		for _, name := range []string{"vol", "clone"} {
			for _, ro := range []bool{false, true} {
				ops = append(ops, badOp{fmt.Sprintf("Open(%s, ro=%v)", name, ro), func() error {
					c, err := fx.st.Open(name, cow.OpenOptions{ReadOnly: ro})
					closeIf(c, err)
					return err
				}, want})
			}
		}
		return append(ops,
			badOp{"OpenSnapshot(snap)", func() error { c, err := fx.st.OpenSnapshot("snap"); closeIf(c, err); return err }, want},
			badOp{"Export(vol)", func() error { return fx.st.Export("vol", filepath.Join(fx.dir, "export.raw"), nil) }, want})
	}
	t.Run("touched", func(t *testing.T) {
		fx := newBadFixture(t)
		later := time.Now().Add(time.Minute)
		if err := os.Chtimes(fx.base, later, later); err != nil {
			t.Fatal(err)
		}
		fx.expectRefused(t, baseOps(fx, cow.ErrBaseChanged), fx.base)
	})
	t.Run("rewritten", func(t *testing.T) {
		fx := newBadFixture(t)
		f, err := os.OpenFile(fx.base, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("changed"), 0)
		f.Close()
		fx.expectRefused(t, baseOps(fx, cow.ErrBaseChanged), fx.base)
	})
	t.Run("removed", func(t *testing.T) {
		fx := newBadFixture(t)
		if err := os.Remove(fx.base); err != nil {
			t.Fatal(err)
		}
		fx.expectRefused(t, baseOps(fx, cow.ErrBaseChanged), fx.base)
	})
}

// badNames are refused everywhere a name is taken.
var badNames = []string{
	"", ".", "..", "../x", "x/..", "a/b", "/abs", ".hidden", "a\x00b", "a b", "a\nb", "ä",
	strings.Repeat("n", 129), strings.Repeat("n", 200),
}

// TestBadNames calls every Store method that takes a name (and Chain.Snapshot) with each
// bad name: ErrInvalidName, and not a file created or changed, lock files included.
func TestBadNames(t *testing.T) {
	fx := newBadFixture(t)
	st := fx.st
	c, err := st.Open("other", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dst := filepath.Join(fx.dir, "export.raw")
	before := storeStateOf(t, st.Dir(), true)
	calls := map[string]func(n string) error{
		"Create":       func(n string) error { return st.Create(n, cow.CreateOptions{Size: bs}) },
		"Create(base)": func(n string) error { return st.Create(n, cow.CreateOptions{Base: fx.base}) },
		"Open":         func(n string) error { c, err := st.Open(n, cow.OpenOptions{}); closeIf(c, err); return err },
		"Open(ro)": func(n string) error {
			c, err := st.Open(n, cow.OpenOptions{ReadOnly: true})
			closeIf(c, err)
			return err
		},
		"OpenSnapshot":      func(n string) error { c, err := st.OpenSnapshot(n); closeIf(c, err); return err },
		"OpenName":          func(n string) error { c, err := st.OpenName(n); closeIf(c, err); return err },
		"Info":              func(n string) error { _, err := st.Info(n); return err },
		"Snapshot(n, snap)": func(n string) error { return st.Snapshot(n, "snapx", nil) },
		"Snapshot(vol, n)":  func(n string) error { return st.Snapshot("vol", n, nil) },
		"Snapshot(open, n)": func(n string) error { return st.Snapshot("other", n, nil) },
		"Chain.Snapshot(n)": func(n string) error { return c.Snapshot(n, nil) },
		"SnapshotGroup(n, snap)": func(n string) error {
			return st.SnapshotGroup([]string{"vol", n}, []string{"g1", "g2"}, nil)
		},
		"SnapshotGroup(vol, n)": func(n string) error {
			return st.SnapshotGroup([]string{"vol", "other"}, []string{"g1", n}, nil)
		},
		"Clone(n, new)":    func(n string) error { return st.Clone(n, "newx", nil) },
		"Clone(snap, n)":   func(n string) error { return st.Clone("snap", n, nil) },
		"Clone(vol, n)":    func(n string) error { return st.Clone("vol", n, nil) },
		"Resize":           func(n string) error { return st.Resize(n, 64*bs) },
		"DeleteVolume":     func(n string) error { return st.DeleteVolume(n) },
		"DeleteSnapshot":   func(n string) error { return st.DeleteSnapshot(n) },
		"Changed(n, vol)":  func(n string) error { _, err := st.Changed(n, "vol"); return err },
		"Changed(snap, n)": func(n string) error { _, err := st.Changed("snap", n); return err },
		"Export":           func(n string) error { return st.Export(n, dst, nil) },
		"ValidateName":     cow.ValidateName,
	}
	names := make([]string, 0, len(calls))
	for k := range calls {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, call := range names {
		for _, n := range badNames {
			if err := calls[call](n); !errors.Is(err, cow.ErrInvalidName) {
				t.Errorf("%s(%q): got %v, want ErrInvalidName", call, n, err)
			}
		}
	}
	assertSameStateOf(t, st.Dir(), before, true)
	if _, err := os.Stat(dst); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("export file created: %v", err)
	}
	// Nothing was created next to the store either (a name like ../x must not escape).
	entries, _ := os.ReadDir(fx.dir)
	for _, e := range entries {
		if n := e.Name(); n != "store" && n != "base.raw" {
			t.Errorf("unexpected file %s beside the store", n)
		}
	}
	// The longest good name works.
	good := strings.Repeat("n", 128)
	if err := st.Create(good, cow.CreateOptions{Size: bs}); err != nil {
		t.Errorf("create with a 128-byte name: %v", err)
	}
	// Names that are fine but do not exist: ErrNotFound, nothing created.
	before = storeStateOf(t, st.Dir(), false)
	for _, call := range []string{"Open", "Open(ro)", "OpenSnapshot", "OpenName", "Info", "Snapshot(n, snap)", "SnapshotGroup(n, snap)", "Clone(n, new)",
		"Resize", "DeleteVolume", "DeleteSnapshot", "Changed(n, vol)", "Changed(snap, n)", "Export"} {
		if err := calls[call]("nosuch"); !errors.Is(err, cow.ErrNotFound) {
			t.Errorf("%s(nosuch): got %v, want ErrNotFound", call, err)
		}
	}
	assertSameState(t, st.Dir(), before)
}
