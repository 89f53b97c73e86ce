package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// binPath is the csi-rawcow binary TestMain builds; the tests run it as a subprocess.
var binPath string

// testEnv is the environment the binary runs in: the caller's, without the CSI_RAWCOW_
// variables, and with a root and a run directory that do not exist, so that neither the
// node's base images nor a server running on this machine reach into a test.
var testEnv []string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "csi-rawcow-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "csi-rawcow")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CSI_RAWCOW_") {
			testEnv = append(testEnv, kv)
		}
	}
	testEnv = append(testEnv, "CSI_RAWCOW_ROOT="+filepath.Join(dir, "no-root"), "CSI_RAWCOW_RUN="+filepath.Join(dir, "no-run"))
	build := exec.Command(goTool(), "build", "-o", binPath, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build csi-rawcow: %v\n", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// goTool finds the go command that runs these tests.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// need skips a test that cannot run here, or fails it in CI, where it must run.
func need(t *testing.T, ok bool, reason string) {
	t.Helper()
	if !ok {
		testfs.Skip(t, "%s", reason)
	}
}

// needTools requires root and the given commands.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	need(t, os.Geteuid() == 0, "needs root (losetup, loop devices)")
	for _, tool := range tools {
		_, err := exec.LookPath(tool)
		need(t, err == nil, tool+" is not installed")
	}
}

type result struct {
	stdout, stderr string
	code           int
}

// run runs `csi-rawcow image --store STORE ARGS...`.
func run(t *testing.T, store string, args ...string) result {
	t.Helper()
	return runIn(t, testEnv, append([]string{"--store", store}, args...)...)
}

// runIn runs `csi-rawcow image ARGS...` in the environment env.
func runIn(t *testing.T, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(binPath, append([]string{"image"}, args...)...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("run %v: %v", args, err)
	}
	return r
}

// mustRun runs a command that must succeed quietly on stderr, and returns its stdout.
func mustRun(t *testing.T, store string, args ...string) string {
	t.Helper()
	r := run(t, store, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("image %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// mustFail runs a command that must fail with code and one line on stderr that contains want.
func mustFail(t *testing.T, store string, code int, want string, args ...string) result {
	t.Helper()
	r := run(t, store, args...)
	if r.code != code {
		t.Fatalf("image %q: exit %d, want %d\nstdout: %s\nstderr: %s", args, r.code, code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, want) {
		t.Fatalf("image %q: stderr %q does not say %q", args, r.stderr, want)
	}
	if code == 1 {
		prefix := "csi-rawcow image " + args[0] + ": "
		if !strings.HasPrefix(r.stderr, prefix) || strings.Count(r.stderr, "\n") != 1 {
			t.Fatalf("image %q: stderr is not one line starting %q: %q", args, prefix, r.stderr)
		}
	}
	return r
}

func decode[T any](t *testing.T, out string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	return v
}

func infoOf(t *testing.T, store, name string) cow.Info {
	t.Helper()
	return decode[cow.Info](t, mustRun(t, store, "info", "--json", name))
}

func layerIDs(info cow.Info) []string {
	var ids []string
	for _, l := range info.Layers {
		ids = append(ids, l.ID)
	}
	return ids
}

// pattern returns n reproducible pseudo-random bytes.
func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// writeVolume opens volume name with the engine directly, as the driver would, and runs fn.
func writeVolume(t *testing.T, store, name string, fn func(c *cow.Chain)) {
	t.Helper()
	st, err := cow.OpenStore(store)
	if err != nil {
		t.Fatal(err)
	}
	c, err := st.Open(name, cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fn(c)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// put writes p at off through the chain and into the model.
func put(t *testing.T, c *cow.Chain, model []byte, off int64, p []byte) {
	t.Helper()
	if _, err := c.WriteAt(p, off); err != nil {
		t.Fatalf("write %d bytes at %d: %v", len(p), off, err)
	}
	copy(model[off:], p)
}

// grow returns model extended with zeros to size.
func grow(model []byte, size int64) []byte {
	return append(slices.Clone(model), make([]byte, size-int64(len(model)))...)
}

// flattenAndCompare exports name to a new file and compares it with want.
func flattenAndCompare(t *testing.T, store, name string, want []byte) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name+".raw")
	r := run(t, store, "flatten", name, out)
	if r.code != 0 {
		t.Fatalf("flatten %s: exit %d: %s", name, r.code, r.stderr)
	}
	if r.stderr != "" {
		t.Fatalf("flatten %s: stderr is not a terminal, yet it got %q", name, r.stderr)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("flatten %s: %d bytes, want %d", name, len(got), len(want))
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("flatten %s: first difference at byte %d: %#x, want %#x", name, i, got[i], want[i])
	}
	return out
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// mapAt returns the map entry that covers off.
func mapAt(t *testing.T, entries []cow.MapEntry, off int64) cow.MapEntry {
	t.Helper()
	for _, e := range entries {
		if e.Off <= off && off < e.Off+e.Len {
			return e
		}
	}
	t.Fatalf("no map entry covers %d", off)
	return cow.MapEntry{}
}

func allocatedOf(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

// TestImageEndToEnd drives every subcommand over one store and checks each result against
// a flat model of what the volumes must read.
func TestImageEndToEnd(t *testing.T) {
	endToEnd(t, filepath.Join(t.TempDir(), "store"))
}

// TestImageEndToEndFS runs the same on each file system a store may live on.
func TestImageEndToEndFS(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: one file system is enough")
	}
	for _, kind := range testfs.Kinds() {
		t.Run(kind, func(t *testing.T) {
			endToEnd(t, filepath.Join(testfs.Mount(t, kind, 512<<20), "store"))
		})
	}
}

func endToEnd(t *testing.T, store string) {
	base := filepath.Join(t.TempDir(), "base.raw")

	// The base: 3 MiB + 1000 bytes (not a multiple of 4096), data with a hole at [1M, 2M).
	const baseSize = 3*MiB + 1000
	baseData := pattern(baseSize, 1)
	clear(baseData[1*MiB : 2*MiB])
	f, err := os.Create(base)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(baseSize); err == nil {
		_, err = f.WriteAt(baseData[:1*MiB], 0)
		if err == nil {
			_, err = f.WriteAt(baseData[2*MiB:], 2*MiB)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	const volSize = (baseSize + cow.BlockSize - 1) / cow.BlockSize * cow.BlockSize

	// create: over the base, the size from the base; a flag after the name works too.
	out := mustRun(t, store, "create", "--base", base, "vol", "--label", "app=test", "--label", "tier=gold")
	if !strings.Contains(out, "created volume vol") || !strings.Contains(out, fmt.Sprint(volSize)) {
		t.Fatalf("create said %q", out)
	}
	info := infoOf(t, store, "vol")
	if info.Kind != "volume" || info.Size != volSize || len(info.Layers) != 2 ||
		info.Layers[0].State != cow.Base || info.Layers[0].Path != base || info.Layers[1].State != cow.Active ||
		info.Labels["app"] != "test" || info.Labels["tier"] != "gold" {
		t.Fatalf("info vol after create: %+v", info)
	}
	baseID := info.Layers[0].ID
	mustRun(t, store, "create", "blank", "1.5M")
	if got := infoOf(t, store, "blank").Size; got != 1536*KiB {
		t.Fatalf("blank: size %d, want %d", got, 1536*KiB)
	}
	mustFail(t, store, 1, "already exists", "create", "blank", "1M")

	// Writes through the engine: aligned, unaligned inside the base's hole, across the base's end.
	model1 := grow(baseData, volSize)
	writeVolume(t, store, "vol", func(c *cow.Chain) {
		put(t, c, model1, 40960, pattern(8192, 2))
		put(t, c, model1, 1*MiB+100, pattern(50, 3))
		put(t, c, model1, baseSize-10, pattern(20, 4))
	})
	flattenAndCompare(t, store, "vol", model1)

	// snapshot, then more writes and a discard over base data.
	out = mustRun(t, store, "snapshot", "vol", "s1")
	if !strings.Contains(out, "created snapshot s1 of volume vol") {
		t.Fatalf("snapshot said %q", out)
	}
	s1 := infoOf(t, store, "s1")
	if s1.Kind != "snapshot" || s1.Source != "vol" || len(s1.Layers) != 2 || s1.Layers[1].State != cow.Frozen {
		t.Fatalf("info s1: %+v", s1)
	}
	l1 := s1.Layers[1]
	model2 := slices.Clone(model1)
	writeVolume(t, store, "vol", func(c *cow.Chain) {
		put(t, c, model2, 2*MiB+5000, pattern(3000, 5))
		put(t, c, model2, 45056, pattern(4096, 6))
		if err := c.Discard(0, 4096); err != nil {
			t.Fatal(err)
		}
		clear(model2[:4096])
	})
	wantChanged := []diffExtent{{0, 4096}, {45056, 4096}, {2*MiB + 4096, 4096}}

	// clone from the snapshot and from the volume (which freezes vol's top, unnamed).
	mustRun(t, store, "clone", "s1", "c1")
	mustRun(t, store, "clone", "vol", "c2")
	vol := infoOf(t, store, "vol")
	if len(vol.Layers) != 4 || vol.Layers[1].ID != l1.ID || vol.Layers[2].State != cow.Frozen {
		t.Fatalf("vol after clone: %v", layerIDs(vol))
	}
	l2 := vol.Layers[2]
	if c1 := infoOf(t, store, "c1"); !slices.Equal(layerIDs(c1)[:2], []string{baseID, l1.ID}) || len(c1.Layers) != 3 {
		t.Fatalf("c1 layers %v", layerIDs(c1))
	}
	if c2 := infoOf(t, store, "c2"); !slices.Equal(layerIDs(c2)[:3], layerIDs(vol)[:3]) || len(c2.Layers) != 4 {
		t.Fatalf("c2 layers %v, vol %v", layerIDs(c2), layerIDs(vol))
	}

	// list
	list := decode[[]cow.Info](t, mustRun(t, store, "list", "--json"))
	var names []string
	for _, in := range list {
		names = append(names, in.Name+":"+in.Kind)
	}
	if want := []string{"blank:volume", "c1:volume", "c2:volume", "s1:snapshot", "vol:volume"}; !slices.Equal(names, want) {
		t.Fatalf("list: %v, want %v", names, want)
	}
	if out := mustRun(t, store, "list"); !strings.Contains(out, "s1") || !strings.Contains(out, "snapshot") {
		t.Fatalf("list: %q", out)
	}

	// map: which layer serves what.
	entries := decode[[]cow.MapEntry](t, mustRun(t, store, "map", "--json", "vol"))
	var next int64
	for _, e := range entries {
		if e.Off != next || e.Len <= 0 {
			t.Fatalf("map entries are not contiguous at %d: %+v", next, e)
		}
		next = e.Off + e.Len
	}
	if next != volSize {
		t.Fatalf("map ends at %d, want %d", next, volSize)
	}
	for _, c := range []struct {
		off   int64
		layer string
		depth int
		data  bool
	}{
		{0, "", -2, false}, // discarded over base data: reads zero (a zero-list entry of l2)
		{4096, baseID, 0, true},
		{40960, l1.ID, 1, true},
		{45056, l2.ID, 2, true},
		{1 * MiB, l1.ID, 1, true},
		{1*MiB + 4096, "", -1, false}, // the base's hole, written by nobody
		{2*MiB + 4096, l2.ID, 2, true},
		{2*MiB + 8192, baseID, 0, true},
		{volSize - 1, l1.ID, 1, true}, // the block across the base's end, copied up
	} {
		e := mapAt(t, entries, c.off)
		if e.Data != c.data || c.data && (e.Layer != c.layer || e.Depth != c.depth) || c.depth == -1 && e.Layer != "" {
			t.Errorf("map at %d: %+v, want layer %q depth %d data %v", c.off, e, c.layer, c.depth, c.data)
		}
	}
	if out := mustRun(t, store, "map", "vol"); !strings.Contains(out, "zero") || !strings.Contains(out, l2.ID) {
		t.Fatalf("map: %q", out)
	}

	// diff: exactly the blocks written or discarded since s1.
	for _, pair := range [][2]string{{"s1", "vol"}, {"vol", "s1"}} {
		rep := decode[diffReport](t, mustRun(t, store, "diff", "--json", pair[0], pair[1]))
		if !slices.Equal(rep.Extents, wantChanged) || rep.Bytes != 3*4096 {
			t.Fatalf("diff %v: %+v, want %v", pair, rep, wantChanged)
		}
		for _, e := range rep.Extents {
			if e.Off%cow.BlockSize != 0 || e.Len%cow.BlockSize != 0 {
				t.Fatalf("diff extent %+v is not block-aligned", e)
			}
		}
	}
	if rep := decode[diffReport](t, mustRun(t, store, "diff", "--json", "s1", "c1")); len(rep.Extents) != 0 || rep.Bytes != 0 {
		t.Fatalf("diff s1 c1: %+v, want nothing", rep)
	}
	if out := mustRun(t, store, "diff", "s1", "vol"); !strings.Contains(out, "12 KiB (12288 bytes) in 3 extents") {
		t.Fatalf("diff: %q", out)
	}

	// resize: relative grow; shrink and snapshots refused.
	out = mustRun(t, store, "resize", "vol", "+1M")
	if infoOf(t, store, "vol").Size != volSize+MiB {
		t.Fatalf("resize +1M: %q", out)
	}
	model2g := grow(model2, volSize+MiB)
	mustFail(t, store, 1, "shrinking is not supported", "resize", "vol", "4096")
	mustFail(t, store, 1, "only volumes can be resized", "resize", "s1", "+1M")
	mustFail(t, store, 2, "invalid size", "resize", "vol", "+1Q")

	// flatten every chain and compare with the model.
	exported := flattenAndCompare(t, store, "vol", model2g)
	flattenAndCompare(t, store, "s1", model1)
	flattenAndCompare(t, store, "c1", model1)
	flattenAndCompare(t, store, "c2", model2)
	if a := allocatedOf(t, exported); a >= volSize+MiB-MiB {
		t.Errorf("export allocates %d bytes: it is not sparse over the 1 MiB hole and the grown end", a)
	}
	mustFail(t, store, 1, "exists", "flatten", "vol", exported)

	t.Run("raw", func(t *testing.T) {
		needTools(t, "qemu-img", "losetup")
		vol := infoOf(t, store, "vol")
		for _, l := range vol.Layers[1:] {
			checkRawImage(t, l.Path, l.Size)
		}
		checkRawImage(t, exported, volSize+MiB)
		want, err := os.ReadFile(exported)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(attachLoop(t, exported))
		if err != nil {
			t.Fatal(err)
		}
		if i := firstDiff(got, want); i >= 0 {
			t.Fatalf("loop device over the export differs from it at byte %d (%d vs %d bytes)", i, len(got), len(want))
		}
		// A layer file is an image of its own: the loop device reads what the file holds.
		got, err = os.ReadFile(attachLoop(t, l1.Path))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[40960:40960+8192], model1[40960:40960+8192]) {
			t.Fatal("loop device over layer l1 does not hold the data written before s1")
		}
	})

	// merge s1: its layer still backs vol, c1 and c2, so it stays.
	out = mustRun(t, store, "merge", "s1")
	if !strings.Contains(out, "still used by c1, c2, vol") {
		t.Fatalf("merge s1 said %q", out)
	}
	mustFail(t, store, 1, "not found", "info", "s1")
	if !exists(l1.Path) {
		t.Fatal("the layer of s1 is gone though c1 and vol need it")
	}
	flattenAndCompare(t, store, "c1", model1)

	// delete c1: l1 then only lengthens the chain below l2, so one of the two is merged into
	// the other (the engine may fold l1 into l2, or l2 into l1: both keep every view).
	out = mustRun(t, store, "delete", "c1")
	if !strings.HasPrefix(out, "deleted volume c1; layers freed: 1, ") {
		t.Fatalf("delete c1 said %q", out)
	}
	vol = infoOf(t, store, "vol")
	has1, has2 := slices.Contains(layerIDs(vol), l1.ID), slices.Contains(layerIDs(vol), l2.ID)
	if len(vol.Layers) != 3 || has1 == has2 || has1 != exists(l1.Path) || has2 != exists(l2.Path) {
		t.Fatalf("after delete c1, vol has layers %v (l1 %s, l2 %s); files exist: %v, %v",
			layerIDs(vol), l1.ID, l2.ID, exists(l1.Path), exists(l2.Path))
	}
	if has2 && !strings.Contains(out, "merged into other chains: 1") {
		t.Fatalf("delete c1 merged l1 into l2 but said %q", out)
	}
	flattenAndCompare(t, store, "vol", model2g)
	flattenAndCompare(t, store, "c2", model2)

	// A snapshot whose only dependent is its volume's top is merged into it.
	model3 := slices.Clone(model2g)
	writeVolume(t, store, "vol", func(c *cow.Chain) { put(t, c, model3, volSize+4096, pattern(4096, 7)) })
	mustRun(t, store, "snapshot", "vol", "s2")
	s2Layer := infoOf(t, store, "s2").Layers[2]
	out = mustRun(t, store, "merge", "s2")
	if !strings.Contains(out, "was merged into the chains of vol") || exists(s2Layer.Path) {
		t.Fatalf("merge s2 said %q; its file exists: %v", out, exists(s2Layer.Path))
	}
	flattenAndCompare(t, store, "vol", model3)

	// A snapshot nobody builds on is freed, and its space with it.
	writeVolume(t, store, "c2", func(c *cow.Chain) { put(t, c, slices.Clone(model2), 0, pattern(256*KiB, 8)) })
	mustRun(t, store, "snapshot", "c2", "s3")
	s3Layer := infoOf(t, store, "s3").Layers[2]
	out = mustRun(t, store, "delete", "c2")
	if !strings.Contains(out, "layers freed: 1, merged into other chains: 0, still used: 2") {
		t.Fatalf("delete c2 said %q", out)
	}
	before := storeAllocated(ptrs(decode[[]cow.Info](t, mustRun(t, store, "list", "--json"))))
	out = mustRun(t, store, "delete", "s3")
	if !strings.Contains(out, "was freed") || exists(s3Layer.Path) {
		t.Fatalf("delete s3 said %q; its file exists: %v", out, exists(s3Layer.Path))
	}
	after := storeAllocated(ptrs(decode[[]cow.Info](t, mustRun(t, store, "list", "--json"))))
	// Freeing s3 lets the engine merge l2 into vol's top too; the file system's metadata
	// blocks (extent trees) may move between layers then, by a block or two.
	if s3Layer.Allocated < 256*KiB || before-after < s3Layer.Allocated-2*cow.BlockSize {
		t.Fatalf("deleting s3 (%d bytes allocated) freed %d bytes", s3Layer.Allocated, before-after)
	}

	if out := mustRun(t, store, "check"); !strings.Contains(out, "No errors") {
		t.Fatalf("check: %q", out)
	}
	mustRun(t, store, "delete", "vol")
	mustRun(t, store, "delete", "blank")
	if list := decode[[]cow.Info](t, mustRun(t, store, "list", "--json")); len(list) != 0 {
		t.Fatalf("list after deleting everything: %+v", list)
	}
	if left := dirNames(filepath.Join(store, "layers")); len(left) != 0 {
		t.Fatalf("layer files left after deleting everything: %v", left)
	}
	mustRun(t, store, "check")
	if !exists(base) {
		t.Fatal("the base file was removed")
	}
	if got, err := os.ReadFile(base); err != nil || !bytes.Equal(got, baseData) {
		t.Fatalf("the base file changed (%v)", err)
	}
}

func ptrs(infos []cow.Info) []*cow.Info {
	out := make([]*cow.Info, len(infos))
	for i := range infos {
		out[i] = &infos[i]
	}
	return out
}

// checkRawImage asks qemu-img whether path is a raw image of size bytes.
func checkRawImage(t *testing.T, path string, size int64) {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-f", "raw", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	var qi struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &qi); err != nil {
		t.Fatalf("qemu-img info %s: %v: %s", path, err, out)
	}
	if qi.Format != "raw" || qi.VirtualSize != size {
		t.Fatalf("qemu-img info %s: format %q, virtual size %d; want raw, %d", path, qi.Format, qi.VirtualSize, size)
	}
}

// attachLoop attaches file read-only to a loop device, detached when the test ends.
func attachLoop(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// storeState is what a command that must change nothing could have changed.
func storeState(t *testing.T, store string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.Walk(store, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(store, path)
		fmt.Fprintf(&b, "%s %v %d %d", rel, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() && rel != ".lock" {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %x", data)
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// newSmallStore makes a store with a written volume, a snapshot of it and a clone.
func newSmallStore(t *testing.T) string {
	t.Helper()
	store := filepath.Join(t.TempDir(), "store")
	mustRun(t, store, "create", "vol", "1M")
	writeVolume(t, store, "vol", func(c *cow.Chain) {
		if _, err := c.WriteAt(pattern(64*KiB, 9), 128*KiB); err != nil {
			t.Fatal(err)
		}
	})
	mustRun(t, store, "snapshot", "vol", "snap")
	mustRun(t, store, "clone", "snap", "clone")
	return store
}

func TestImageCheck(t *testing.T) {
	store := newSmallStore(t)
	if out := mustRun(t, store, "check"); !strings.Contains(out, "No errors") {
		t.Fatalf("check on a clean store: %q", out)
	}
	if rep := decode[checkReport](t, mustRun(t, store, "check", "--json")); !rep.Clean || len(rep.Problems) != 0 {
		t.Fatalf("check --json on a clean store: %+v", rep)
	}
	snap := infoOf(t, store, "snap").Layers[0]
	top := infoOf(t, store, "clone").Layers[1]

	// A layer file of the wrong size.
	if err := os.Truncate(snap.Path, snap.Size-4096); err != nil {
		t.Fatal(err)
	}
	state := storeState(t, store)
	r := run(t, store, "check")
	if r.code != 1 || !strings.Contains(r.stdout, "layer "+snap.ID) || !strings.Contains(r.stdout, fmt.Sprintf("has %d bytes", snap.Size-4096)) {
		t.Fatalf("check with a truncated layer: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if storeState(t, store) != state {
		t.Fatal("check changed the store")
	}
	if err := os.Truncate(snap.Path, snap.Size); err != nil {
		t.Fatal(err)
	}

	// A missing layer file.
	if err := os.Remove(top.Path); err != nil {
		t.Fatal(err)
	}
	state = storeState(t, store)
	r = run(t, store, "check", "--json")
	rep := decode[checkReport](t, r.stdout)
	if r.code != 1 || rep.Clean || !slices.ContainsFunc(rep.Problems, func(p cow.Problem) bool { return p.Subject == "layer "+top.ID }) {
		t.Fatalf("check --json with a missing layer: exit %d %+v", r.code, rep)
	}
	if storeState(t, store) != state {
		t.Fatal("check changed the store")
	}

	// A stray file is reported, and removed by --repair; nothing else is touched.
	store = newSmallStore(t)
	stray := filepath.Join(store, "layers", strings.Repeat("ab", 16)+".raw")
	if err := os.WriteFile(stray, []byte("stray"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = run(t, store, "check")
	if r.code != 1 || !strings.Contains(r.stdout, "stray file") {
		t.Fatalf("check with a stray file: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	manifest, err := os.ReadFile(filepath.Join(store, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	rep = decode[checkReport](t, mustRun(t, store, "check", "--repair", "--json"))
	if !rep.Clean || !slices.Equal(rep.Removed, []string{"layers/" + filepath.Base(stray)}) || exists(stray) {
		t.Fatalf("check --repair: %+v; stray exists: %v", rep, exists(stray))
	}
	if now, _ := os.ReadFile(filepath.Join(store, "manifest.json")); !bytes.Equal(now, manifest) {
		t.Fatal("check --repair changed the manifest of a store whose chains were sound")
	}
}

// TestImageBadNames: a bad name is refused with a clear error, and nothing changes.
func TestImageBadNames(t *testing.T) {
	store := newSmallStore(t)
	manifest, err := os.ReadFile(filepath.Join(store, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	state := storeState(t, store)
	dst := filepath.Join(t.TempDir(), "out.raw")
	for _, bad := range []string{"..", "../x", "a/b", "/etc", "", ".hidden", "a b", strings.Repeat("n", 200)} {
		for _, args := range [][]string{
			{"create", bad, "1M"},
			{"create", "--base", "/dev/null", bad},
			{"info", bad},
			{"map", bad},
			{"snapshot", "vol", bad},
			{"snapshot", bad, "s2"},
			{"clone", "snap", bad},
			{"clone", bad, "c2"},
			{"resize", bad, "2M"},
			{"merge", bad},
			{"delete", bad},
			{"flatten", bad, dst},
			{"diff", bad, "vol"},
			{"diff", "vol", bad},
			{"import", bad, "/dev/null"},
			{"rm", bad},
			{"create", "--image=" + bad, "v"},
			{"create", "--image", "img", bad},
		} {
			if args[1] == "--image=" {
				continue // an empty --image is no image: a usage error, tested in TestImageUsage
			}
			mustFail(t, store, 1, "invalid name", args...)
		}
	}
	if now, _ := os.ReadFile(filepath.Join(store, "manifest.json")); !bytes.Equal(now, manifest) {
		t.Fatal("a command with a bad name changed the manifest")
	}
	if storeState(t, store) != state {
		t.Fatal("a command with a bad name changed the store")
	}
	if exists(dst) {
		t.Fatal("flatten with a bad name created its output")
	}
	// A bad name never creates a store either.
	fresh := filepath.Join(t.TempDir(), "fresh")
	mustFail(t, fresh, 1, "invalid name", "create", "../x", "1M")
	if exists(fresh) {
		t.Fatal("create with a bad name created the store directory")
	}
}

func TestImageUsage(t *testing.T) {
	store := newSmallStore(t)
	state := storeState(t, store)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "missing command"},
		{[]string{"frobnicate"}, 2, "unknown command"},
		{[]string{"create"}, 2, "usage: csi-rawcow image [--root DIR] [--store DIR] create"},
		{[]string{"create", "v"}, 2, "missing SIZE"},
		{[]string{"create", "v", "10X"}, 2, "unknown unit"},
		{[]string{"create", "v", "0"}, 2, "invalid size"},
		{[]string{"create", "--label", "novalue", "v", "1M"}, 2, "want KEY=VALUE"},
		{[]string{"create", "--bogus", "v", "1M"}, 2, "flag provided but not defined"},
		{[]string{"info"}, 2, "missing arguments"},
		{[]string{"info", "a", "b"}, 2, "too many arguments"},
		{[]string{"check", "x"}, 2, "too many arguments"},
		{[]string{"snapshot", "snap", "s2"}, 1, "snap is a snapshot, not a volume"},
		{[]string{"merge", "vol"}, 1, "use delete to remove a volume"},
		{[]string{"info", "nope"}, 1, "not found"},
		{[]string{"clone", "nope", "c2"}, 1, "not found"},
		{[]string{"diff", "vol", "nope"}, 1, "not found"},
		{[]string{"create", "--base", "/nonexistent/base.raw", "v"}, 1, "not found"},
		{[]string{"create", "--image=", "v"}, 2, "missing SIZE"},
		{[]string{"create", "--image", "img", "v"}, 1, "no base images in"},
		{[]string{"import", "img"}, 2, "missing arguments"},
		{[]string{"rm"}, 2, "missing arguments"},
		{[]string{"rm", "img"}, 1, "no base images in"},
	} {
		mustFail(t, store, c.code, c.want, c.args...)
	}
	if storeState(t, store) != state {
		t.Fatal("a refused command changed the store")
	}
	if r := run(t, store, "create", "-h"); r.code != 0 || !strings.Contains(r.stderr, "-base FILE") {
		t.Fatalf("create -h: exit %d: %s", r.code, r.stderr)
	}
	if r := run(t, store, "help"); r.code != 0 || !strings.Contains(r.stdout, "flatten") {
		t.Fatalf("help: exit %d: %s", r.code, r.stdout)
	}
	// A missing store is not created by a command that only reads.
	missing := filepath.Join(t.TempDir(), "missing")
	mustFail(t, missing, 1, "does not exist", "list")
	if exists(missing) {
		t.Fatal("list created a store")
	}
	// The store comes from $CSI_RAWCOW_STORE without --store.
	cmd := exec.Command(binPath, "image", "list", "--json")
	cmd.Env = append(slices.Clone(testEnv), "CSI_RAWCOW_STORE="+store)
	out, err := cmd.Output()
	if err != nil || len(decode[[]cow.Info](t, string(out))) != 3 {
		t.Fatalf("list with $CSI_RAWCOW_STORE: %v: %s", err, out)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"4096": 4096, "0": 0, "10G": 10 << 30, "10g": 10 << 30, "512M": 512 << 20, "1T": 1 << 40,
		"1.5M": 1536 << 10, "4k": 4096, "4KB": 4096, "4KiB": 4096, "2GiB": 2 << 30, "100B": 100,
		"0.5K": 512, "7E": 7 << 60,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "1.2.3G", ".5G", "5.G", "-1", "1X", "1KX", "1.1K", "8E", "1e3", "1 G", "+1G", "1iB", "1BB", "1KBB"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestHumanSize(t *testing.T) {
	for in, want := range map[int64]string{
		0: "0 B", 1023: "1023 B", 1024: "1 KiB", 1536 << 10: "1.5 MiB", 10 << 30: "10 GiB", 3149824: "3 MiB",
	} {
		if got := humanSize(in); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", in, got, want)
		}
	}
}

// TestImageCheckCorruptManifest: a manifest that does not parse is a problem check reports,
// with or without --repair, and leaves as it is.
func TestImageCheckCorruptManifest(t *testing.T) {
	store := newSmallStore(t)
	path := filepath.Join(store, "manifest.json")
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	state := storeState(t, store)
	r := run(t, store, "check")
	if r.code != 1 || !strings.HasPrefix(r.stdout, "manifest.json: ") {
		t.Fatalf("check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = mustFail(t, store, 1, "corrupt store", "check", "--repair")
	if !strings.HasPrefix(r.stdout, "manifest.json: ") || !strings.HasPrefix(r.stderr, "csi-rawcow image check: repair: ") {
		t.Fatalf("check --repair: %s%s", r.stdout, r.stderr)
	}
	mustFail(t, store, 1, "corrupt store", "list")
	if storeState(t, store) != state {
		t.Fatal("check changed a store whose manifest does not parse")
	}
}

// TestImageBusy: a volume open read-write elsewhere (attached) is not read or changed behind
// its server's back; its snapshots are.
func TestImageBusy(t *testing.T) {
	store := newSmallStore(t)
	st, err := cow.OpenStore(store)
	if err != nil {
		t.Fatal(err)
	}
	c, err := st.Open("vol", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	state := storeState(t, store)
	dst := filepath.Join(t.TempDir(), "vol.raw")
	for _, args := range [][]string{
		{"map", "vol"}, {"flatten", "vol", dst}, {"snapshot", "vol", "s2"}, {"resize", "vol", "+1M"},
		{"delete", "vol"}, {"clone", "vol", "c2"},
	} {
		mustFail(t, store, 1, "in use", args...)
	}
	if r := run(t, store, "flatten", "vol", dst); !strings.Contains(r.stderr, "snapshot it and use the snapshot") || exists(dst) {
		t.Fatalf("flatten of an attached volume: %q; output exists: %v", r.stderr, exists(dst))
	}
	if storeState(t, store) != state {
		t.Fatal("a refused command changed the store")
	}
	mustRun(t, store, "info", "vol")
	mustRun(t, store, "flatten", "snap", dst)
}

// TestImageThroughServer: snapshot, resize and clone of a volume the node's server has
// attached go through that server (live, the device follows); delete is refused with what
// to do; without the server, or with a server of another store, the volume stays busy.
func TestImageThroughServer(t *testing.T) {
	needTools(t, "flock")
	_, err := os.Stat("/dev/fuse")
	need(t, err == nil, "no /dev/fuse")
	store := filepath.Join(t.TempDir(), "store")
	runDir := filepath.Join(t.TempDir(), "run")
	mustRun(t, store, "create", "vol", "4M")
	st, err := cow.OpenStore(store)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := blockdev.NewServer(st, runDir, blockdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctl, err := srv.ServeControl()
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctl.Close()
		if err := srv.Close(); err != nil {
			t.Errorf("close the server: %v", err)
		}
		if loops, err := blockdev.Loops(runDir); err != nil || len(loops) > 0 {
			t.Errorf("loop devices left over %s: %+v (%v)", runDir, loops, err)
		}
	})
	a, err := srv.Attach("vol", blockdev.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := os.OpenFile(a.Device, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	model := make([]byte, 4*MiB)
	write := func(off int64, p []byte) {
		t.Helper()
		if _, err := dev.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		if err := dev.Sync(); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	viaServer := func(want string, args ...string) string {
		t.Helper()
		r := runIn(t, testEnv, append([]string{"--store", store, "--run-dir", runDir}, args...)...)
		note := fmt.Sprintf("csi-rawcow image %s: volume %s is attached; done through the server in %s\n", args[0], args[1], runDir)
		if r.code != 0 || r.stderr != note || !strings.Contains(r.stdout, want) {
			t.Fatalf("image %v: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
		}
		return r.stdout
	}

	// snapshot: point in time; later writes to the device do not reach it.
	write(0, pattern(MiB, 50))
	viaServer("created snapshot s1 of volume vol", "snapshot", "vol", "s1")
	model1 := slices.Clone(model)
	write(512*KiB, pattern(MiB, 51))
	flattenAndCompare(t, store, "s1", model1)

	// Without the server's run directory the volume is busy, and nothing changes.
	state := storeState(t, store)
	for _, args := range [][]string{{"snapshot", "vol", "s2"}, {"resize", "vol", "+1M"}, {"clone", "vol", "c2"}} {
		mustFail(t, store, 1, "in use", args...)
		mustFail(t, store, 1, "no csi-rawcow server answers", args...)
	}
	if storeState(t, store) != state {
		t.Fatal("a refused command changed the store")
	}

	// resize: the loop device takes up the new size at once.
	viaServer("resized volume vol: 4 MiB -> 8 MiB", "resize", "vol", "+4M")
	if size, err := unix.IoctlGetUint64(int(dev.Fd()), unix.BLKGETSIZE64); err != nil || size != 8*MiB {
		t.Fatalf("the device has %d bytes after the resize (%v), want %d", size, err, 8*MiB)
	}
	model = grow(model, 8*MiB)
	write(7*MiB, pattern(4096, 52)) // beyond the old end
	mustFail(t, store, 1, "only volumes can be resized", "resize", "s1", "+1M", "--run-dir", runDir)
	r := runIn(t, testEnv, "--store", store, "--run-dir", runDir, "resize", "vol", "4M")
	if r.code != 1 || !strings.Contains(r.stderr, "shrinking is not supported; volumes only grow") {
		t.Fatalf("shrink through the server: exit %d: %s", r.code, r.stderr)
	}

	// clone of the attached volume: its top is frozen live; the clone reads what it held.
	viaServer("created volume c1 from vol", "clone", "vol", "c1")
	modelC1 := slices.Clone(model)
	write(0, pattern(4096, 53)) // the device goes on over a new top
	flattenAndCompare(t, store, "c1", modelC1)
	mustRun(t, store, "snapshot", "c1", "c1-s") // not attached: done here, quietly

	// delete: refused while attached, saying by whom and what to do.
	state = storeState(t, store)
	r = mustFail(t, store, 1, "in use", "delete", "vol", "--run-dir", runDir)
	if !strings.Contains(r.stderr, "has it attached as "+a.Device) || !strings.Contains(r.stderr, "detach it first") {
		t.Fatalf("delete of an attached volume: %q", r.stderr)
	}
	if storeState(t, store) != state {
		t.Fatal("a refused delete changed the store")
	}

	// Another store with a volume of the same name, held by another process: the server
	// (which serves this store's vol) must not be asked, and this store must not change.
	other := newSmallStore(t)
	lock := filepath.Join(other, "locks", "vol.lock")
	if err := os.MkdirAll(filepath.Dir(lock), 0o755); err != nil {
		t.Fatal(err)
	}
	holder := exec.Command("flock", "--exclusive", lock, "sleep", "60")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	for i := 0; ; i++ {
		if pids, _ := lockHolders(lock); slices.Contains(pids, holder.Process.Pid) {
			break
		}
		if i == 500 {
			t.Fatal("flock never took the lock")
		}
		time.Sleep(10 * time.Millisecond)
	}
	otherState := storeState(t, other)
	for _, args := range [][]string{{"snapshot", "vol", "x"}, {"resize", "vol", "+1M"}, {"clone", "vol", "x"}} {
		mustFail(t, other, 1, "serves a volume vol of another store", append(args, "--run-dir", runDir)...)
	}
	if storeState(t, store) != state || storeState(t, other) != otherState {
		t.Fatal("a command on another store's busy volume changed a store")
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Detach("vol"); err != nil {
		t.Fatal(err)
	}
	flattenAndCompare(t, store, "vol", model)
}
