package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// listed is what list --json says of one entry.
type listed struct {
	cow.Info
	Path  string   `json:"path"`
	Users []string `json:"users"`
}

// runRoot runs `csi-rawcow image --root ROOT ARGS...` and requires success with a quiet stderr.
func runRoot(t *testing.T, root string, args ...string) string {
	t.Helper()
	r := runIn(t, testEnv, append([]string{"--root", root}, args...)...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("image --root %s %s: exit %d\nstdout: %s\nstderr: %s", root, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// failRoot runs a command under --root ROOT that must fail with code, saying want.
func failRoot(t *testing.T, root string, code int, want string, args ...string) result {
	t.Helper()
	r := runIn(t, testEnv, append([]string{"--root", root}, args...)...)
	if r.code != code || !strings.Contains(r.stderr, want) {
		t.Fatalf("image --root %s %s: exit %d (want %d), stderr %q does not say %q", root, strings.Join(args, " "), r.code, code, r.stderr, want)
	}
	return r
}

func listOf(t *testing.T, root string) []listed {
	t.Helper()
	return decode[[]listed](t, runRoot(t, root, "list", "--json"))
}

// writeSparse writes a file of size bytes holding data at the given offsets, holes elsewhere,
// and returns its full contents.
func writeSparse(t *testing.T, path string, size int64, parts map[int64][]byte) []byte {
	t.Helper()
	want := make([]byte, size)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, p := range parts {
		if _, err := f.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	return want
}

// TestImageImportRaw: a raw file becomes a base image (byte for byte, still sparse), list
// shows it, volumes build on it by name, and rm refuses it while they do.
func TestImageImportRaw(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	src := filepath.Join(t.TempDir(), "disk.img")
	const size = 8*MiB + 1000
	want := writeSparse(t, src, size, map[int64][]byte{0: pattern(MiB, 20), 5 * MiB: pattern(12345, 21)})

	// A node without images lists nothing and makes nothing.
	failRoot(t, root, 1, "does not exist", "list")
	if exists(root) {
		t.Fatal("list made the root directory")
	}

	// --root after the command works as well as before it.
	out := mustRunIn(t, "import", "--root", root, "base", src)
	path := filepath.Join(root, "images", "base.raw")
	if !strings.HasPrefix(out, "imported raw image "+src+" as base ("+path+"): virtual size 8 MiB (8389608 bytes)") {
		t.Fatalf("import said %q", out)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("the imported image differs from its source at byte %d", i)
	}
	if a := allocatedOf(t, path); a > 2*MiB {
		t.Fatalf("the imported image allocates %d bytes for 1 MiB + 12345 bytes of data: not sparse", a)
	}
	if exists(filepath.Join(root, "store")) {
		t.Fatal("import made a store")
	}

	// Only images yet: list shows them without a store.
	l := listOf(t, root)
	if len(l) != 1 || l[0].Name != "base" || l[0].Kind != "image" || l[0].Size != size || l[0].Path != path || len(l[0].Users) != 0 {
		t.Fatalf("list after import: %+v", l)
	}
	if out := runRoot(t, root, "list"); !strings.Contains(out, "base") || !strings.Contains(out, "image") || !strings.Contains(out, path) {
		t.Fatalf("list: %q", out)
	}

	failRoot(t, root, 1, "already exists", "import", "base", src)
	failRoot(t, root, 1, "invalid name", "import", "../evil", src)
	failRoot(t, root, 1, "no such file", "import", "other", filepath.Join(t.TempDir(), "missing.img"))
	failRoot(t, root, 1, "not a regular file", "import", "other", t.TempDir())
	if names := dirNames(filepath.Join(root, "images")); !slices.Equal(names, []string{"base.raw"}) {
		t.Fatalf("refused imports left files: %v", names)
	}

	// create --image builds on ROOT/images/NAME.raw; the size comes from the image.
	out = runRoot(t, root, "create", "--image", "base", "vol")
	if !strings.Contains(out, "base "+path) {
		t.Fatalf("create --image said %q", out)
	}
	runRoot(t, root, "create", "--image", "base", "big", "1G")
	runRoot(t, root, "snapshot", "vol", "snap")
	r := runIn(t, testEnv, "--root", root, "info", "--json", "vol")
	info := decode[cow.Info](t, r.stdout)
	if info.Size != (size+cow.BlockSize-1)/cow.BlockSize*cow.BlockSize || info.Layers[0].Path != path || info.Layers[0].State != cow.Base {
		t.Fatalf("info vol: %+v", info)
	}
	flat := filepath.Join(t.TempDir(), "vol.raw")
	runRoot(t, root, "flatten", "vol", flat)
	if got, _ := os.ReadFile(flat); !bytes.Equal(got[:size], want) {
		t.Fatal("a volume over the image does not read the image")
	}
	failRoot(t, root, 1, "not found", "create", "--image", "nope", "v2")
	failRoot(t, root, 1, "invalid name", "create", "--image", "../base", "v2")
	failRoot(t, root, 2, "give one", "create", "--image", "base", "--base", src, "v2")

	// list: the image with its users, then the volumes and snapshots.
	var kinds []string
	for _, e := range listOf(t, root) {
		kinds = append(kinds, e.Name+":"+e.Kind)
		if e.Kind == "image" && !slices.Equal(e.Users, []string{"big", "vol", "snap"}) {
			t.Fatalf("the image's users: %v", e.Users)
		}
	}
	if !slices.Equal(kinds, []string{"base:image", "big:volume", "snap:snapshot", "vol:volume"}) {
		t.Fatalf("list: %v", kinds)
	}

	// rm is refused while chains build on the image, and names them.
	r = failRoot(t, root, 1, "in use", "rm", "base")
	if !strings.Contains(r.stderr, "big, vol, snap") || !strings.HasPrefix(r.stderr, "csi-rawcow image rm: ") || strings.Count(r.stderr, "\n") != 1 {
		t.Fatalf("rm of a used image: %q", r.stderr)
	}
	runRoot(t, root, "delete", "vol")
	runRoot(t, root, "delete", "big")
	failRoot(t, root, 1, "used by snap", "rm", "base")
	runRoot(t, root, "delete", "snap")
	if out := runRoot(t, root, "rm", "base"); !strings.HasPrefix(out, "removed image base") {
		t.Fatalf("rm said %q", out)
	}
	if exists(path) {
		t.Fatal("rm left the image file")
	}
	failRoot(t, root, 1, "not found", "rm", "base")
	if l := listOf(t, root); len(l) != 0 {
		t.Fatalf("list after rm: %+v", l)
	}
	if !exists(src) {
		t.Fatal("the source of the import is gone")
	}
}

// mustRunIn runs `csi-rawcow image ARGS...` (the flags where the arguments put them).
func mustRunIn(t *testing.T, args ...string) string {
	t.Helper()
	r := runIn(t, testEnv, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("image %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// TestImageImportQcow2: a qcow2 image is converted to a raw base image with its data.
func TestImageImportQcow2(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		_, err := exec.LookPath(tool)
		need(t, err == nil, tool+" is not installed")
	}
	root := filepath.Join(t.TempDir(), "root")
	src := filepath.Join(t.TempDir(), "disk.qcow2")
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", src, "16M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 9M 64k", src},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	out := runRoot(t, root, "import", "vm", src)
	if !strings.HasPrefix(out, "imported qcow2 image ") || !strings.Contains(out, "virtual size 16 MiB") {
		t.Fatalf("import said %q", out)
	}
	path := filepath.Join(root, "images", "vm.raw")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16*MiB)
	copy(want, bytes.Repeat([]byte{0x5a}, MiB))
	copy(want[9*MiB:], bytes.Repeat([]byte{0xa5}, 64*KiB))
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("the imported image differs from the qcow2's data at byte %d (%d bytes, want %d)", i, len(got), len(want))
	}
	if a := allocatedOf(t, path); a > 2*MiB {
		t.Fatalf("the converted image allocates %d bytes for 1 MiB + 64 KiB of data", a)
	}
	checkRawImage(t, path, 16*MiB)
	runRoot(t, root, "create", "--image", "vm", "vol")
	flat := filepath.Join(t.TempDir(), "vol.raw")
	runRoot(t, root, "flatten", "vol", flat)
	if got, _ := os.ReadFile(flat); !bytes.Equal(got, want) {
		t.Fatal("a volume over the converted image does not read the qcow2's data")
	}
}

// TestImageRootAndStore: --root names both the store and the images; --store overrides the
// store only; the environment gives the defaults, and flags win over it.
func TestImageRootAndStore(t *testing.T) {
	dir := t.TempDir()
	root, other := filepath.Join(dir, "root"), filepath.Join(dir, "other")
	runRoot(t, root, "create", "a", "1M")
	if !exists(filepath.Join(root, "store", "manifest.json")) {
		t.Fatal("--root did not put the store in ROOT/store")
	}
	img := filepath.Join(dir, "img.raw")
	writeSparse(t, img, MiB, map[int64][]byte{0: pattern(4096, 30)})
	runRoot(t, root, "import", "img", img)

	names := func(r result) []string {
		t.Helper()
		if r.code != 0 {
			t.Fatalf("list: exit %d: %s", r.code, r.stderr)
		}
		var out []string
		for _, e := range decode[[]listed](t, r.stdout) {
			out = append(out, e.Name)
		}
		return out
	}
	mustRun(t, other, "create", "b", "1M") // --store alone
	env := func(kv ...string) []string { return append(slices.Clone(testEnv), kv...) }
	for _, c := range []struct {
		env  []string
		args []string
		want []string
	}{
		{testEnv, []string{"--root", root}, []string{"img", "a"}},
		{testEnv, []string{"--root", root, "--store", other}, []string{"img", "b"}},
		{testEnv, []string{"--store", other, "--root", root}, []string{"img", "b"}},
		{env("CSI_RAWCOW_ROOT=" + root), nil, []string{"img", "a"}},
		{env("CSI_RAWCOW_ROOT="+root, "CSI_RAWCOW_STORE="+other), nil, []string{"img", "b"}},
		{env("CSI_RAWCOW_STORE=" + other), []string{"--root", root}, []string{"img", "a"}},
		{env("CSI_RAWCOW_ROOT=" + root), []string{"--store", other}, []string{"img", "b"}},
	} {
		args := append(slices.Clone(c.args), "list", "--json")
		if got := names(runIn(t, c.env, args...)); !slices.Equal(got, c.want) {
			t.Errorf("%v with %v: list shows %v, want %v", c.args, c.env[len(testEnv):], got, c.want)
		}
		// The same flags after the command.
		args = append([]string{"list", "--json"}, c.args...)
		if got := names(runIn(t, c.env, args...)); !slices.Equal(got, c.want) {
			t.Errorf("list %v with %v: shows %v, want %v", c.args, c.env[len(testEnv):], got, c.want)
		}
	}
}

// TestImportProgress: import draws a bar on a terminal, and only there.
func TestImportProgress(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	src := filepath.Join(t.TempDir(), "disk.img")
	writeSparse(t, src, 64*MiB, map[int64][]byte{0: pattern(8*MiB, 40), 32 * MiB: pattern(8*MiB, 41)})
	master, slave := openPTY(t)
	out := drain(master)
	cmd := exec.Command(binPath, "image", "--root", root, "import", "disk", src)
	cmd.Env = testEnv
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, slave
	if err := cmd.Run(); err != nil {
		t.Fatalf("import: %v", err)
	}
	slave.Close()
	tty := receive(t, out)
	if !strings.Contains(tty, "import disk") || !strings.Contains(tty, "100%") || !strings.Contains(tty, "MiB") {
		t.Fatalf("no progress bar on the terminal: %q", tty)
	}
	if s := stdout.String(); !strings.HasPrefix(s, "imported raw image ") || strings.Count(s, "\n") != 1 {
		t.Fatalf("stdout: %q", s)
	}
}
