package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	mount "k8s.io/mount-utils"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// csiConn are the three services of one endpoint.
type csiConn struct {
	conn  *grpc.ClientConn
	id    csi.IdentityClient
	ctl   csi.ControllerClient
	node  csi.NodeClient
	group csi.GroupControllerClient
}

// dialCSI connects to a CSI unix socket; the connection closes at the end of the test.
func dialCSI(t testing.TB, sock string) *csiConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &csiConn{conn: conn, id: csi.NewIdentityClient(conn), ctl: csi.NewControllerClient(conn), node: csi.NewNodeClient(conn),
		group: csi.NewGroupControllerClient(conn)}
}

func mountCapOf(fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func blockCapOf() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func capWithMode(c *csi.VolumeCapability, m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	c = proto.Clone(c).(*csi.VolumeCapability)
	c.AccessMode.Mode = m
	return c
}

func capWithFlags(c *csi.VolumeCapability, flags ...string) *csi.VolumeCapability {
	c = proto.Clone(c).(*csi.VolumeCapability)
	c.GetMount().MountFlags = flags
	return c
}

func capacity(required, limit int64) *csi.CapacityRange {
	return &csi.CapacityRange{RequiredBytes: required, LimitBytes: limit}
}

// treeOf describes every entry under dir, relative path -> type and size; files named in
// hash (relative paths, or "*" for all) also get their sha256. Paths under skip are not
// entered. A missing dir gives an empty map.
func treeOf(t testing.TB, dir string, hash []string, skip ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	hashAll := len(hash) == 1 && hash[0] == "*"
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		for _, s := range skip {
			if rel == s {
				return filepath.SkipDir
			}
		}
		fi, err := e.Info()
		if err != nil {
			return nil // gone meanwhile
		}
		switch {
		case fi.IsDir():
			out[rel] = "dir"
		case fi.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(path)
			out[rel] = "link -> " + target
		case fi.Mode().IsRegular():
			desc := fmt.Sprintf("file %d %v", fi.Size(), fi.Mode().Perm())
			if hashAll || hasString(hash, rel) {
				b, err := os.ReadFile(path)
				if err != nil {
					return err
				}
				sum := sha256.Sum256(b)
				desc += " " + hex.EncodeToString(sum[:])
			}
			out[rel] = desc
		default:
			out[rel] = fi.Mode().Type().String()
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	return out
}

func hasString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// diffTrees describes how b differs from a, "" if not at all.
func diffTrees(a, b map[string]string) string {
	var d []string
	for k, v := range a {
		if w, ok := b[k]; !ok {
			d = append(d, fmt.Sprintf("- %s (%s)", k, v))
		} else if w != v {
			d = append(d, fmt.Sprintf("~ %s: %s -> %s", k, v, w))
		}
	}
	for k, v := range b {
		if _, ok := a[k]; !ok {
			d = append(d, fmt.Sprintf("+ %s (%s)", k, v))
		}
	}
	sort.Strings(d)
	return strings.Join(d, "\n")
}

// mountsUnder lists the mount points under any of dirs, in mount order.
func mountsUnder(t testing.TB, dirs ...string) []string {
	t.Helper()
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mi := range infos {
		for _, d := range dirs {
			if mi.MountPoint == d || strings.HasPrefix(mi.MountPoint, d+"/") {
				out = append(out, mi.MountPoint)
			}
		}
	}
	return out
}

// hostileWorld is everything a hostile request could disturb, captured to compare.
type hostileWorld struct {
	store, sandbox, parent, etc map[string]string
	attached                    string
	loops                       string
	mounts                      string
	autoclear                   string
}

type hostileEnv struct {
	td      *testDriver
	c       *csiConn
	sandbox string // victims and CO-made directories; the test runs with its cwd inside
	runDir  string
}

func (e *hostileEnv) world(t testing.TB) hostileWorld {
	t.Helper()
	var w hostileWorld
	// The store with its manifest hashed; layer files by size (the data of a mounted
	// fixture may change), the presentation's run dir is described by its attachments.
	w.store = treeOf(t, e.td.root, []string{"store/manifest.json"}, "run")
	w.sandbox = treeOf(t, e.sandbox, []string{"*"})
	w.parent = treeOf(t, filepath.Dir(e.td.root), nil, filepath.Base(e.td.root), filepath.Base(e.sandbox))
	w.etc = treeOf(t, "/etc", []string{"passwd", "hostname"}, skipAllBut("/etc")...)
	as, err := e.td.srv.List()
	if err != nil {
		t.Fatal(err)
	}
	var parts []string
	for _, a := range as {
		parts = append(parts, fmt.Sprintf("%s=%s ro=%v stale=%v", a.Name, a.Device, a.ReadOnly, a.Stale))
	}
	w.attached = strings.Join(parts, "; ")
	loops, err := blockdev.Loops(e.runDir)
	if err != nil {
		t.Fatal(err)
	}
	parts = parts[:0]
	var auto []string
	for _, l := range loops {
		parts = append(parts, l.Device+"="+l.Backing)
		b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(l.Device), "loop", "autoclear"))
		auto = append(auto, l.Device+"="+strings.TrimSpace(string(b)))
	}
	sort.Strings(parts)
	sort.Strings(auto)
	w.loops = strings.Join(parts, "; ")
	w.autoclear = strings.Join(auto, "; ")
	ms := mountsUnder(t, e.td.root, e.sandbox)
	sort.Strings(ms)
	w.mounts = strings.Join(ms, "; ")
	return w
}

// skipAllBut lists the subdirectories of dir, so that treeOf looks at dir's own entries only.
func skipAllBut(dir string) []string {
	entries, _ := os.ReadDir(dir)
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}

func (w hostileWorld) diff(o hostileWorld) string {
	var d []string
	add := func(what, diff string) {
		if diff != "" {
			d = append(d, what+":\n"+diff)
		}
	}
	add("store", diffTrees(w.store, o.store))
	add("sandbox", diffTrees(w.sandbox, o.sandbox))
	add("parent of the root", diffTrees(w.parent, o.parent))
	add("/etc", diffTrees(w.etc, o.etc))
	for _, x := range []struct{ what, a, b string }{
		{"attachments", w.attached, o.attached}, {"loop devices", w.loops, o.loops},
		{"loop autoclear", w.autoclear, o.autoclear}, {"mounts", w.mounts, o.mounts},
	} {
		if x.a != x.b {
			d = append(d, fmt.Sprintf("%s: %q -> %q", x.what, x.a, x.b))
		}
	}
	return strings.Join(d, "\n")
}

type hostileCase struct {
	name string
	want []codes.Code
	call func(ctx context.Context) error
}

func hc(name string, call func(ctx context.Context) error, want ...codes.Code) hostileCase {
	return hostileCase{name: name, want: want, call: call}
}

// call adapts a client call that returns a response and an error.
func rpcErr[R any](f func() (R, error)) error { _, err := f(); return err }

// hostileIDs are values no volume or snapshot ID of this driver can have, keyed by a
// printable description. prefix is the ID kind they imitate.
func hostileIDs(prefix string) map[string]string {
	hex32 := strings.Repeat("0123456789abcdef", 2)
	return map[string]string{
		"dotdot":         "..",
		"traversal":      "../../etc/passwd",
		"absolute":       "/etc",
		"slash":          "a/b",
		"hex-with-slash": prefix + hex32[:15] + "/" + hex32[16:],
		"hex-with-dots":  prefix + "../" + hex32[3:],
		"upper-hex":      prefix + strings.ToUpper(hex32),
		"short":          prefix + hex32[1:],
		"long":           prefix + hex32 + "0",
		"10KB":           prefix + strings.Repeat("a", 10<<10),
		"NUL":            prefix + hex32[:16] + "\x00" + hex32[17:],
		"prefix-only":    prefix,
		"space":          " " + prefix + hex32,
		"newline":        prefix + hex32 + "\n",
	}
}

// TestHostileInput sends every RPC of the three services requests with hostile IDs, names,
// paths, parameters, capacities and capabilities. Each must fail with the code the CSI spec
// gives (or succeed where the spec says so, e.g. deleting what does not exist) and change
// nothing: the store (names, sizes, the manifest's sha256), the attachments, loop devices
// and mounts, a sandbox of victim files (an etc/passwd among them) that relative and
// absolute paths point at, the test's working directory, the parent of the driver's root
// and the real /etc.
func TestHostileInput(t *testing.T) {
	td := startDriver(t)
	sandbox := t.TempDir()
	e := &hostileEnv{td: td, c: dialCSI(t, td.endpoint), sandbox: sandbox, runDir: filepath.Join(td.root, "run")}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// The sandbox: victims, CO-made directories, and the working directory, from which
	// "../../etc/passwd" is the victim passwd.
	victimDir := filepath.Join(sandbox, "etc")
	victim := filepath.Join(victimDir, "passwd")
	emptyFile := filepath.Join(sandbox, "empty-file")
	emptyDir := filepath.Join(sandbox, "empty-dir")
	link := filepath.Join(sandbox, "link-to-etc")
	fileLink := filepath.Join(sandbox, "link-to-passwd")
	cwd := filepath.Join(sandbox, "x", "cwd")
	stageM := filepath.Join(sandbox, "stage-m")
	targetM := filepath.Join(sandbox, "target-m")
	stageB := filepath.Join(sandbox, "stage-b")
	targetB := filepath.Join(sandbox, "target-b")
	stageU := filepath.Join(sandbox, "stage-u")
	for _, d := range []string{victimDir, emptyDir, cwd, stageM, stageB, stageU} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(victim, []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(emptyFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victimDir, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, fileLink); err != nil {
		t.Fatal(err)
	}
	t.Chdir(cwd)
	// Whatever a failing case mounted in the sandbox goes before the fixtures are unstaged
	// (cleanups run last-in first-out: this one runs after theirs).
	t.Cleanup(func() { sweepMounts(t, sandbox) })

	// Fixtures: a staged and published mount volume, a staged and published block volume,
	// an unstaged (formatted) volume, and a snapshot.
	mustCreate := func(name string, c *csi.VolumeCapability, size int64) string {
		t.Helper()
		r, err := e.c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{c}, CapacityRange: capacity(size, 0)})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		return r.Volume.VolumeId
	}
	volM := mustCreate("fixture-mount", mountCapOf("ext4"), 32<<20)
	volB := mustCreate("fixture-block", blockCapOf(), 16<<20)
	volU := mustCreate("fixture-unstaged", mountCapOf("ext4"), 32<<20)
	snap, err := e.c.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "fixture-snap", SourceVolumeId: volM})
	if err != nil {
		t.Fatal(err)
	}
	snapS := snap.Snapshot.SnapshotId
	stage := func(id, path string, c *csi.VolumeCapability) {
		t.Helper()
		if _, err := e.c.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: path, VolumeCapability: c}); err != nil {
			t.Fatalf("stage %s: %v", id, err)
		}
	}
	unstage := func(id, path string) {
		t.Helper()
		if _, err := e.c.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: path}); err != nil {
			t.Errorf("unstage %s: %v", id, err)
		}
	}
	publish := func(id, staging, target string, c *csi.VolumeCapability) {
		t.Helper()
		if _, err := e.c.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c}); err != nil {
			t.Fatalf("publish %s: %v", id, err)
		}
	}
	unpublish := func(id, target string) {
		t.Helper()
		if _, err := e.c.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Errorf("unpublish %s: %v", id, err)
		}
	}
	stage(volU, stageU, mountCapOf("ext4")) // formats it
	unstage(volU, stageU)
	if err := os.MkdirAll(stageU, 0o755); err != nil { // the CO's directory again
		t.Fatal(err)
	}
	stage(volM, stageM, mountCapOf("ext4"))
	t.Cleanup(func() { unstage(volM, stageM) })
	publish(volM, stageM, targetM, mountCapOf("ext4"))
	t.Cleanup(func() { unpublish(volM, targetM) })
	stage(volB, stageB, blockCapOf())
	t.Cleanup(func() { unstage(volB, stageB) })
	publish(volB, stageB, targetB, blockCapOf())
	t.Cleanup(func() { unpublish(volB, targetB) })
	if err := os.WriteFile(filepath.Join(targetM, "data"), []byte("fixture data"), 0o644); err != nil {
		t.Fatal(err)
	}

	absentVol := volumePrefix + strings.Repeat("0", idHexLen)
	absentSnap := snapshotPrefix + strings.Repeat("0", idHexLen)
	long := strings.Repeat("x", 10<<10)
	nodeID := "node-1"

	var cases []hostileCase
	add := func(c ...hostileCase) { cases = append(cases, c...) }
	ctl, node, ident := e.c.ctl, e.c.node, e.c.id

	// Identity: no inputs to abuse, but they must answer and leave nothing behind (Probe
	// writes a probe file into the store).
	add(hc("Identity/GetPluginInfo", func(ctx context.Context) error {
		return rpcErr(func() (*csi.GetPluginInfoResponse, error) {
			return ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		})
	}, codes.OK))
	add(hc("Identity/GetPluginCapabilities", func(ctx context.Context) error {
		return rpcErr(func() (*csi.GetPluginCapabilitiesResponse, error) {
			return ident.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
		})
	}, codes.OK))
	add(hc("Identity/Probe", func(ctx context.Context) error {
		return rpcErr(func() (*csi.ProbeResponse, error) { return ident.Probe(ctx, &csi.ProbeRequest{}) })
	}, codes.OK))

	// Volume IDs: empty is InvalidArgument everywhere; one this driver cannot have made is
	// NotFound, except that deleting it succeeds (it does not exist).
	volIDs := hostileIDs(volumePrefix)
	volIDs["snapshot-id"] = snapS
	volIDs["absent"] = absentVol
	volIDs["victim-path"] = victim
	volIDs["empty"] = ""
	for _, key := range keysSorted(volIDs) {
		id := volIDs[key]
		notFound, deleted := codes.NotFound, codes.OK
		if id == "" {
			notFound, deleted = codes.InvalidArgument, codes.InvalidArgument
		}
		p := "volumeID=" + key + "/"
		add(
			hc(p+"DeleteVolume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.DeleteVolumeResponse, error) {
					return ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
				})
			}, deleted),
			hc(p+"ValidateVolumeCapabilities", func(ctx context.Context) error {
				return rpcErr(func() (*csi.ValidateVolumeCapabilitiesResponse, error) {
					return ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{mountCapOf("")}})
				})
			}, notFound),
			hc(p+"ControllerGetVolume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.ControllerGetVolumeResponse, error) {
					return ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
				})
			}, notFound),
			hc(p+"ControllerGetVolumeHealth", func(ctx context.Context) error {
				return rpcErr(func() (*csi.ControllerGetVolumeHealthResponse, error) {
					return ctl.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
				})
			}, notFound),
			hc(p+"ControllerExpandVolume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.ControllerExpandVolumeResponse, error) {
					return ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: capacity(64<<20, 0), VolumeCapability: mountCapOf("")})
				})
			}, notFound),
			hc(p+"CreateSnapshot", func(ctx context.Context) error {
				return rpcErr(func() (*csi.CreateSnapshotResponse, error) {
					return ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "hostile-snap", SourceVolumeId: id})
				})
			}, notFound),
			hc(p+"CreateVolume-from-volume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.CreateVolumeResponse, error) {
					return ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "hostile-clone", VolumeCapabilities: []*csi.VolumeCapability{mountCapOf("")},
						VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}})
				})
			}, notFound),
			hc(p+"ListSnapshots-by-source", func(ctx context.Context) error {
				r, err := ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: id})
				if err == nil && len(r.Entries) != 0 && id != "" {
					return fmt.Errorf("listed %d snapshots of %q", len(r.Entries), id)
				}
				return err
			}, codes.OK),
			hc(p+"NodeStageVolume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeStageVolumeResponse, error) {
					return node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(sandbox, "new-stage"), VolumeCapability: mountCapOf("")})
				})
			}, notFound),
			hc(p+"NodePublishVolume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodePublishVolumeResponse, error) {
					return node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: stageM, TargetPath: victim, VolumeCapability: mountCapOf("")})
				})
			}, notFound),
			hc(p+"NodeGetVolumeStats", func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeGetVolumeStatsResponse, error) {
					return node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: targetM})
				})
			}, notFound),
			hc(p+"NodeExpandVolume", func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeExpandVolumeResponse, error) {
					return node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: targetM, CapacityRange: capacity(64<<20, 0)})
				})
			}, notFound),
			hc(p+"NodeGetVolumeHealth", func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeGetVolumeHealthResponse, error) {
					return node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
				})
			}, notFound),
		)
		// Unpublish and unstage of a volume that does not exist may succeed (nothing to
		// undo) but must never touch the path they are given: the victim passwd file, the
		// directory holding it, a symlink to it.
		unpubWant := []codes.Code{notFound}
		if id == absentVol {
			unpubWant = []codes.Code{codes.InvalidArgument, codes.NotFound}
		}
		for _, path := range []string{victim, victimDir, fileLink} {
			add(hostileCase{name: p + "NodeUnpublishVolume-" + filepath.Base(path), want: unpubWant, call: func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeUnpublishVolumeResponse, error) {
					return node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: path})
				})
			}})
			add(hostileCase{name: p + "NodeUnstageVolume-" + filepath.Base(path), want: unpubWant, call: func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeUnstageVolumeResponse, error) {
					return node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: path})
				})
			}})
		}
	}
	// The victim's directory is not empty, so removing it would fail anyway; the absent
	// volume may also say Internal for it.
	for i := range cases {
		if strings.HasPrefix(cases[i].name, "volumeID=absent/NodeUn") && strings.HasSuffix(cases[i].name, "-etc") {
			cases[i].want = append(cases[i].want, codes.Internal, codes.FailedPrecondition)
		}
	}

	// Snapshot IDs, the same way.
	snapIDs := hostileIDs(snapshotPrefix)
	snapIDs["volume-id"] = volM
	snapIDs["absent"] = absentSnap
	snapIDs["empty"] = ""
	for _, key := range keysSorted(snapIDs) {
		id := snapIDs[key]
		notFound, deleted := codes.NotFound, codes.OK
		if id == "" {
			notFound, deleted = codes.InvalidArgument, codes.InvalidArgument
		}
		p := "snapshotID=" + key + "/"
		add(
			hc(p+"DeleteSnapshot", func(ctx context.Context) error {
				return rpcErr(func() (*csi.DeleteSnapshotResponse, error) {
					return ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
				})
			}, deleted),
			hc(p+"GetSnapshot", func(ctx context.Context) error {
				return rpcErr(func() (*csi.GetSnapshotResponse, error) {
					return ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id})
				})
			}, notFound),
			hc(p+"CreateVolume-from-snapshot", func(ctx context.Context) error {
				return rpcErr(func() (*csi.CreateVolumeResponse, error) {
					return ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "hostile-restore", VolumeCapabilities: []*csi.VolumeCapability{mountCapOf("")},
						VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}})
				})
			}, notFound),
		)
		if id != "" {
			add(hc(p+"ListSnapshots-by-id", func(ctx context.Context) error {
				r, err := ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
				if err == nil && len(r.Entries) != 0 {
					return fmt.Errorf("listed %d snapshots for %q", len(r.Entries), id)
				}
				return err
			}, codes.OK))
		}
	}

	// CreateVolume: names, parameters, capabilities, capacities, sources, topology.
	createVol := func(name string, req *csi.CreateVolumeRequest, want ...codes.Code) hostileCase {
		if req.Name == "" && !strings.Contains(name, "empty-name") {
			req.Name = "hostile-volume"
		}
		if req.VolumeCapabilities == nil && !strings.Contains(name, "no-capabilities") {
			req.VolumeCapabilities = []*csi.VolumeCapability{mountCapOf("")}
		}
		return hc("CreateVolume/"+name, func(ctx context.Context) error {
			return rpcErr(func() (*csi.CreateVolumeResponse, error) { return ctl.CreateVolume(ctx, req) })
		}, want...)
	}
	caps := func(c ...*csi.VolumeCapability) []*csi.VolumeCapability { return c }
	add(
		createVol("empty-name", &csi.CreateVolumeRequest{}, codes.InvalidArgument),
		createVol("10KB-name", &csi.CreateVolumeRequest{Name: long}, codes.InvalidArgument),
		createVol("129-byte-name", &csi.CreateVolumeRequest{Name: strings.Repeat("n", 129)}, codes.InvalidArgument),
		createVol("no-capabilities", &csi.CreateVolumeRequest{}, codes.InvalidArgument),
		createVol("nil-capability", &csi.CreateVolumeRequest{VolumeCapabilities: caps(nil)}, codes.InvalidArgument),
		createVol("no-access-mode", &csi.CreateVolumeRequest{VolumeCapabilities: caps(&csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}})}, codes.InvalidArgument),
		createVol("no-access-type", &csi.CreateVolumeRequest{VolumeCapabilities: caps(&csi.VolumeCapability{AccessMode: mountCapOf("").AccessMode})}, codes.InvalidArgument),
		createVol("one-good-one-bad-capability", &csi.CreateVolumeRequest{VolumeCapabilities: caps(mountCapOf(""), mountCapOf("btrfs"))}, codes.InvalidArgument),
	)
	for _, m := range []csi.VolumeCapability_AccessMode_Mode{
		csi.VolumeCapability_AccessMode_UNKNOWN,
		csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_Mode(99),
	} {
		add(createVol("mode="+m.String(), &csi.CreateVolumeRequest{VolumeCapabilities: caps(capWithMode(mountCapOf(""), m))}, codes.InvalidArgument))
		add(createVol("block-mode="+m.String(), &csi.CreateVolumeRequest{VolumeCapabilities: caps(capWithMode(blockCapOf(), m))}, codes.InvalidArgument))
	}
	for key, fsType := range map[string]string{"btrfs": "btrfs", "dotdot-ext4": "../ext4", "EXT4": "EXT4", "ext4-NUL": "ext4\x00", "10KB": long, "abs": "/sbin/mkfs.ext4", "ext4-space": "ext4 "} {
		add(createVol("fsType="+key, &csi.CreateVolumeRequest{VolumeCapabilities: caps(mountCapOf(fsType))}, codes.InvalidArgument))
	}
	for key, params := range map[string]map[string]string{
		"unknown":            {"foo": "bar"},
		"case":               {"baseimage": "x"},
		"dotdot-key":         {"../x": "y"},
		"NUL-key":            {"baseImage\x00": "x"},
		"10KB-key":           {long: "x"},
		"empty-key":          {"": "x"},
		"sidecar-lookalike":  {"csi.storage.k8s.io": "x"},
		"sidecar-lookalike2": {"csi-storage-k8s-io/pvc/name": "x"},
		"fsType":             {"fsType": "ext4"}, // not a parameter of this driver
	} {
		add(createVol("param="+key, &csi.CreateVolumeRequest{Parameters: params}, codes.InvalidArgument))
	}
	for key, img := range map[string]string{
		"dotdot-x": "../x", "abs": "/abs/path", "victim": victim, "dot": ".", "dotdot": "..", "slash": "a/b",
		"10KB": long, "NUL": "x\x00", "hidden": ".x", "traversal": "../../etc/passwd", "space": "a b",
	} {
		add(createVol("baseImage="+key, &csi.CreateVolumeRequest{Parameters: map[string]string{"baseImage": img}}, codes.InvalidArgument))
	}
	add(createVol("baseImage=not-in-store", &csi.CreateVolumeRequest{Parameters: map[string]string{"baseImage": "not-in-store"}}, codes.FailedPrecondition))
	add(createVol("baseImage=raw-suffix", &csi.CreateVolumeRequest{Parameters: map[string]string{"baseImage": "x.raw"}}, codes.FailedPrecondition))
	for key, r := range map[string]*csi.CapacityRange{
		"negative-required":       capacity(-1, 0),
		"negative-limit":          capacity(0, -1),
		"both-negative":           capacity(-1<<40, -1),
		"min-int64":               capacity(math.MinInt64, 0),
		"limit-below-required":    capacity(10<<20, 5<<20),
		"limit-1":                 capacity(0, 1),
		"limit-below-minimum":     capacity(0, 1<<19),
		"huge-1<<62":              capacity(1<<62, 0),
		"max-int64":               capacity(math.MaxInt64, 0),
		"max-int64-limit-equal":   capacity(math.MaxInt64, math.MaxInt64),
		"max-int64-minus-4095":    capacity(math.MaxInt64-4095, 0),
		"unaligned-limit-too-low": capacity(1<<20+1, 1<<20+1),
	} {
		want := codes.OutOfRange
		if r.RequiredBytes < 0 || r.LimitBytes < 0 {
			want = codes.InvalidArgument
		}
		add(createVol("capacity="+key, &csi.CreateVolumeRequest{CapacityRange: r}, want))
	}
	add(createVol("xfs-limit-below-xfs-minimum", &csi.CreateVolumeRequest{VolumeCapabilities: caps(mountCapOf("xfs")), CapacityRange: capacity(0, 100<<20)}, codes.OutOfRange))
	add(
		createVol("source-empty-oneof", &csi.CreateVolumeRequest{VolumeContentSource: &csi.VolumeContentSource{}}, codes.InvalidArgument),
		createVol("source-snapshot-nil", &csi.CreateVolumeRequest{VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{}}}, codes.InvalidArgument),
		createVol("source-and-baseImage", &csi.CreateVolumeRequest{Parameters: map[string]string{"baseImage": "x"},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapS}}}}, codes.InvalidArgument),
		createVol("source-snapshot-limit-too-small", &csi.CreateVolumeRequest{CapacityRange: capacity(0, 16<<20),
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapS}}}}, codes.OutOfRange),
		createVol("topology-other-node", &csi.CreateVolumeRequest{AccessibilityRequirements: &csi.TopologyRequirement{
			Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "other-node"}}}}}, codes.ResourceExhausted),
		createVol("topology-traversal-node", &csi.CreateVolumeRequest{AccessibilityRequirements: &csi.TopologyRequirement{
			Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "../" + nodeID}}}}}, codes.ResourceExhausted),
		// The fixture's name with other parameters, size or source: AlreadyExists.
		createVol("existing-name-other-size", &csi.CreateVolumeRequest{Name: "fixture-mount", CapacityRange: capacity(64<<20, 64<<20)}, codes.AlreadyExists),
		createVol("existing-name-smaller-limit", &csi.CreateVolumeRequest{Name: "fixture-mount", CapacityRange: capacity(0, 16<<20)}, codes.AlreadyExists),
		createVol("existing-name-with-source", &csi.CreateVolumeRequest{Name: "fixture-mount", CapacityRange: capacity(32<<20, 0),
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapS}}}}, codes.AlreadyExists),
		createVol("existing-name-other-baseImage", &csi.CreateVolumeRequest{Name: "fixture-mount", CapacityRange: capacity(32<<20, 0),
			Parameters: map[string]string{"baseImage": "not-in-store"}}, codes.AlreadyExists),
	)

	// CreateSnapshot.
	createSnap := func(name string, req *csi.CreateSnapshotRequest, want ...codes.Code) hostileCase {
		return hc("CreateSnapshot/"+name, func(ctx context.Context) error {
			return rpcErr(func() (*csi.CreateSnapshotResponse, error) { return ctl.CreateSnapshot(ctx, req) })
		}, want...)
	}
	add(
		createSnap("empty-name", &csi.CreateSnapshotRequest{SourceVolumeId: volM}, codes.InvalidArgument),
		createSnap("10KB-name", &csi.CreateSnapshotRequest{Name: long, SourceVolumeId: volM}, codes.InvalidArgument),
		createSnap("129-byte-name", &csi.CreateSnapshotRequest{Name: strings.Repeat("n", 129), SourceVolumeId: volM}, codes.InvalidArgument),
		createSnap("empty-source", &csi.CreateSnapshotRequest{Name: "hostile-snap"}, codes.InvalidArgument),
		createSnap("existing-name-other-volume", &csi.CreateSnapshotRequest{Name: "fixture-snap", SourceVolumeId: volB}, codes.AlreadyExists),
	)
	for key, params := range map[string]map[string]string{
		"unknown": {"foo": "bar"}, "dotdot": {"../x": "y"}, "sidecar-prefix-only": {"csi.storage.k8s.io/": "x"},
		"10KB": {long: ""}, "baseImage": {"baseImage": "x"}, "NUL": {"\x00": ""},
	} {
		add(createSnap("param="+key, &csi.CreateSnapshotRequest{Name: "hostile-snap", SourceVolumeId: volM, Parameters: params}, codes.InvalidArgument))
	}

	// Listing: tokens this driver did not hand out are Aborted; a negative maximum is
	// InvalidArgument.
	for key, tok := range map[string]string{"dotdot": "..", "negative": "-1", "beyond": "99999", "10KB": long, "NUL": "1\x00", "hex": "0x1", "space": " 1"} {
		add(
			hc("ListVolumes/token="+key, func(ctx context.Context) error {
				return rpcErr(func() (*csi.ListVolumesResponse, error) {
					return ctl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: tok})
				})
			}, codes.Aborted),
			hc("ListSnapshots/token="+key, func(ctx context.Context) error {
				return rpcErr(func() (*csi.ListSnapshotsResponse, error) {
					return ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: tok})
				})
			}, codes.Aborted),
			hc("ControllerListVolumeHealth/token="+key, func(ctx context.Context) error {
				return rpcErr(func() (*csi.ControllerListVolumeHealthResponse, error) {
					return ctl.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{StartingToken: tok})
				})
			}, codes.Aborted),
		)
	}
	add(
		hc("ListVolumes/max=-1", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ListVolumesResponse, error) {
				return ctl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1})
			})
		}, codes.InvalidArgument),
		hc("ListSnapshots/max=-1", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ListSnapshotsResponse, error) {
				return ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: -1})
			})
		}, codes.InvalidArgument),
		hc("ControllerListVolumeHealth/max=-1", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerListVolumeHealthResponse, error) {
				return ctl.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{MaxEntries: -1})
			})
		}, codes.InvalidArgument),
		hc("GetCapacity/unknown-param", func(ctx context.Context) error {
			return rpcErr(func() (*csi.GetCapacityResponse, error) {
				// Capacity does not depend on parameters; CreateVolume refuses the class.
				return ctl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"../x": "y"}})
			})
		}, codes.OK),
		hc("GetCapacity/multi-node", func(ctx context.Context) error {
			r, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{VolumeCapabilities: caps(capWithMode(mountCapOf(""), csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER))})
			if err == nil && r.AvailableCapacity != 0 {
				return fmt.Errorf("capacity %d for a multi-node volume", r.AvailableCapacity)
			}
			return err
		}, codes.OK),
		hc("GetCapacity/other-node", func(ctx context.Context) error {
			r, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: "../" + nodeID}}})
			if err == nil && r.AvailableCapacity != 0 {
				return fmt.Errorf("capacity %d for another node", r.AvailableCapacity)
			}
			return err
		}, codes.OK),
		hc("ValidateVolumeCapabilities/no-capabilities", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ValidateVolumeCapabilitiesResponse, error) {
				return ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: volM})
			})
		}, codes.InvalidArgument),
		hc("ControllerPublishVolume", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerPublishVolumeResponse, error) {
				return ctl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: volM, NodeId: "../" + nodeID, VolumeCapability: mountCapOf("")})
			})
		}, codes.NotFound),
		hc("ControllerUnpublishVolume", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerUnpublishVolumeResponse, error) {
				return ctl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: volM, NodeId: nodeID})
			})
		}, codes.OK),
		hc("ControllerModifyVolume", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerModifyVolumeResponse, error) {
				return ctl.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: volM, MutableParameters: map[string]string{"baseImage": "../x"}})
			})
		}, codes.InvalidArgument),
	)
	// Capabilities the driver does not support are not confirmed (an answer, not an error).
	for key, c := range map[string]*csi.VolumeCapability{
		"multi-node": capWithMode(mountCapOf(""), csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER),
		"btrfs":      mountCapOf("btrfs"), "dotdot-ext4": mountCapOf("../ext4"),
	} {
		add(hc("ValidateVolumeCapabilities/"+key, func(ctx context.Context) error {
			r, err := ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: volM, VolumeCapabilities: caps(c)})
			if err == nil && r.Confirmed != nil {
				return fmt.Errorf("confirmed %v", c)
			}
			return err
		}, codes.OK))
	}
	add(hc("ValidateVolumeCapabilities/unknown-param", func(ctx context.Context) error {
		r, err := ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: volM, VolumeCapabilities: caps(mountCapOf("")), Parameters: map[string]string{"../x": ""}})
		if err == nil && r.Confirmed != nil {
			return fmt.Errorf("confirmed an unknown parameter")
		}
		return err
	}, codes.OK))

	// ControllerExpandVolume of the published mount volume.
	for key, r := range map[string]*csi.CapacityRange{
		"nil": nil, "negative-required": capacity(-1, 0), "negative-limit": capacity(0, -1),
		"limit-below-required": capacity(64<<20, 32<<20), "huge-1<<62": capacity(1<<62, 0),
		"max-int64": capacity(math.MaxInt64, 0), "max-int64-minus-4095": capacity(math.MaxInt64-4095, 0),
		"limit-below-size": capacity(0, 16<<20),
	} {
		want := codes.OutOfRange
		if r == nil || r.RequiredBytes < 0 || r.LimitBytes < 0 {
			want = codes.InvalidArgument
		}
		add(hc("ControllerExpandVolume/capacity="+key, func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerExpandVolumeResponse, error) {
				return ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: volM, CapacityRange: r, VolumeCapability: mountCapOf("")})
			})
		}, want))
	}

	// Node: paths and capabilities with real volumes. volU is not staged: a failed stage
	// must not leave it attached.
	nodeStage := func(name string, req *csi.NodeStageVolumeRequest, want ...codes.Code) hostileCase {
		if req.VolumeId == "" {
			req.VolumeId = volU
		}
		if req.VolumeCapability == nil {
			req.VolumeCapability = mountCapOf("")
		}
		return hc("NodeStageVolume/"+name, func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeStageVolumeResponse, error) { return node.NodeStageVolume(ctx, req) })
		}, want...)
	}
	add(
		nodeStage("no-staging-path", &csi.NodeStageVolumeRequest{}, codes.InvalidArgument),
		nodeStage("no-capability", &csi.NodeStageVolumeRequest{StagingTargetPath: stageU, VolumeCapability: &csi.VolumeCapability{}}, codes.InvalidArgument),
		nodeStage("relative-path", &csi.NodeStageVolumeRequest{StagingTargetPath: "rel/stage"}, codes.InvalidArgument),
		nodeStage("traversal-path", &csi.NodeStageVolumeRequest{StagingTargetPath: "../../etc"}, codes.InvalidArgument),
		nodeStage("dot-path", &csi.NodeStageVolumeRequest{StagingTargetPath: "."}, codes.InvalidArgument),
		nodeStage("file-path", &csi.NodeStageVolumeRequest{StagingTargetPath: victim}, codes.InvalidArgument),
		nodeStage("empty-file-path", &csi.NodeStageVolumeRequest{StagingTargetPath: emptyFile}, codes.InvalidArgument),
		nodeStage("symlink-path", &csi.NodeStageVolumeRequest{StagingTargetPath: link}, codes.InvalidArgument),
		nodeStage("path-under-file", &csi.NodeStageVolumeRequest{StagingTargetPath: filepath.Join(victim, "x")}, codes.InvalidArgument),
		nodeStage("fsType=btrfs", &csi.NodeStageVolumeRequest{StagingTargetPath: stageU, VolumeCapability: mountCapOf("btrfs")}, codes.InvalidArgument),
		nodeStage("fsType=../ext4", &csi.NodeStageVolumeRequest{StagingTargetPath: stageU, VolumeCapability: mountCapOf("../ext4")}, codes.InvalidArgument),
		nodeStage("multi-node", &csi.NodeStageVolumeRequest{StagingTargetPath: stageU, VolumeCapability: capWithMode(mountCapOf(""), csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}, codes.InvalidArgument),
		// The mount fails: the loop device attached for it must go again.
		nodeStage("bad-mount-flag", &csi.NodeStageVolumeRequest{StagingTargetPath: stageU, VolumeCapability: capWithFlags(mountCapOf(""), "no-such-option")}, codes.InvalidArgument, codes.Internal),
		nodeStage("mount-flag-bind", &csi.NodeStageVolumeRequest{StagingTargetPath: stageU, VolumeCapability: capWithFlags(mountCapOf(""), "bind,no-such-option")}, codes.InvalidArgument, codes.Internal),
		// A snapshot ID is not a volume.
		nodeStage("snapshot-id", &csi.NodeStageVolumeRequest{VolumeId: snapS, StagingTargetPath: stageU}, codes.NotFound),
	)
	nodePublish := func(name string, req *csi.NodePublishVolumeRequest, want ...codes.Code) hostileCase {
		if req.VolumeId == "" {
			req.VolumeId = volM
		}
		if req.VolumeCapability == nil {
			req.VolumeCapability = mountCapOf("")
		}
		return hc("NodePublishVolume/"+name, func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodePublishVolumeResponse, error) { return node.NodePublishVolume(ctx, req) })
		}, want...)
	}
	newTarget := filepath.Join(sandbox, "new-target")
	add(
		nodePublish("no-target", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM}, codes.InvalidArgument),
		nodePublish("no-staging", &csi.NodePublishVolumeRequest{TargetPath: newTarget}, codes.InvalidArgument),
		nodePublish("relative-target", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: "rel/target"}, codes.InvalidArgument),
		nodePublish("traversal-target", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: "../../etc/passwd"}, codes.InvalidArgument),
		nodePublish("relative-staging", &csi.NodePublishVolumeRequest{StagingTargetPath: "../../etc", TargetPath: newTarget}, codes.InvalidArgument),
		nodePublish("file-target", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: victim}, codes.InvalidArgument),
		nodePublish("symlink-target", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: link}, codes.InvalidArgument),
		nodePublish("target-under-file", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: filepath.Join(victim, "x")}, codes.InvalidArgument),
		nodePublish("block-file-target", &csi.NodePublishVolumeRequest{VolumeId: volB, VolumeCapability: blockCapOf(), StagingTargetPath: stageB, TargetPath: victim}, codes.InvalidArgument),
		nodePublish("block-symlink-target", &csi.NodePublishVolumeRequest{VolumeId: volB, VolumeCapability: blockCapOf(), StagingTargetPath: stageB, TargetPath: fileLink}, codes.InvalidArgument),
		// A staging path that is not where the volume is staged would bind-mount whatever
		// lies there into the pod.
		nodePublish("foreign-staging", &csi.NodePublishVolumeRequest{StagingTargetPath: victimDir, TargetPath: newTarget}, codes.FailedPrecondition),
		nodePublish("other-volumes-staging", &csi.NodePublishVolumeRequest{StagingTargetPath: stageB, TargetPath: newTarget}, codes.FailedPrecondition),
		nodePublish("fsType=btrfs", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: newTarget, VolumeCapability: mountCapOf("btrfs")}, codes.InvalidArgument),
		nodePublish("fsType=../ext4", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: newTarget, VolumeCapability: mountCapOf("../ext4")}, codes.InvalidArgument),
		nodePublish("multi-node", &csi.NodePublishVolumeRequest{StagingTargetPath: stageM, TargetPath: newTarget, VolumeCapability: capWithMode(mountCapOf(""), csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}, codes.InvalidArgument),
		nodePublish("not-staged", &csi.NodePublishVolumeRequest{VolumeId: volU, StagingTargetPath: stageU, TargetPath: newTarget}, codes.FailedPrecondition),
		nodePublish("snapshot-id", &csi.NodePublishVolumeRequest{VolumeId: snapS, StagingTargetPath: stageM, TargetPath: newTarget}, codes.NotFound),
	)
	// Unpublish and unstage of real volumes at paths that are not theirs.
	for _, x := range []struct {
		name  string
		id    string
		path  string
		want  []codes.Code
		stage bool
	}{
		{"victim-file", volM, victim, []codes.Code{codes.InvalidArgument}, false},
		{"symlink-to-file", volM, fileLink, []codes.Code{codes.InvalidArgument}, false},
		{"relative", volM, "../../etc/passwd", []codes.Code{codes.InvalidArgument}, false},
		{"relative-dir", volM, "../../etc", []codes.Code{codes.InvalidArgument}, false},
		{"victim-dir", volM, victimDir, []codes.Code{codes.InvalidArgument, codes.FailedPrecondition, codes.Internal}, false},
		{"block-victim-file", volB, victim, []codes.Code{codes.InvalidArgument}, false},
		{"victim-file", volM, victim, []codes.Code{codes.InvalidArgument}, true},
		{"relative", volM, "../../etc/passwd", []codes.Code{codes.InvalidArgument}, true},
		{"victim-dir", volM, victimDir, []codes.Code{codes.InvalidArgument, codes.FailedPrecondition, codes.Internal}, true},
		// Unstaging while the volume is still published (at its own staging path or at a
		// foreign one) must not pull the device from under the pod.
		{"still-published", volM, stageM, []codes.Code{codes.FailedPrecondition}, true},
		{"still-published-block", volB, stageB, []codes.Code{codes.FailedPrecondition}, true},
		{"still-published-foreign-path", volM, emptyDir, []codes.Code{codes.FailedPrecondition}, true},
		{"still-published-block-foreign-path", volB, emptyDir, []codes.Code{codes.FailedPrecondition}, true},
	} {
		x := x
		if x.stage {
			add(hostileCase{name: "NodeUnstageVolume/" + x.name + "/" + x.id[:12], want: x.want, call: func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeUnstageVolumeResponse, error) {
					return node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: x.id, StagingTargetPath: x.path})
				})
			}})
		} else {
			add(hostileCase{name: "NodeUnpublishVolume/" + x.name + "/" + x.id[:12], want: x.want, call: func(ctx context.Context) error {
				return rpcErr(func() (*csi.NodeUnpublishVolumeResponse, error) {
					return node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: x.id, TargetPath: x.path})
				})
			}})
		}
	}
	add(
		hc("NodeUnpublishVolume/no-target", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeUnpublishVolumeResponse, error) {
				return node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volM})
			})
		}, codes.InvalidArgument),
		hc("NodeUnstageVolume/no-staging", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeUnstageVolumeResponse, error) {
				return node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: volM})
			})
		}, codes.InvalidArgument),
	)
	// Stats and expansion at paths where the volume is not.
	for key, path := range map[string]string{
		"etc": "/etc", "root": "/", "victim-dir": victimDir, "victim-file": victim, "other-volume": targetB,
		"relative": "../../etc", "dot": ".", "missing": filepath.Join(sandbox, "missing"), "proc": "/proc/self",
	} {
		add(hc("NodeGetVolumeStats/path="+key, func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeGetVolumeStatsResponse, error) {
				return node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volM, VolumePath: path})
			})
		}, codes.NotFound, codes.InvalidArgument))
		add(hc("NodeExpandVolume/path="+key, func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeExpandVolumeResponse, error) {
				return node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: volM, VolumePath: path, VolumeCapability: mountCapOf("")})
			})
		}, codes.NotFound, codes.InvalidArgument))
	}
	add(
		hc("NodeGetVolumeStats/block-at-mount-target", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeGetVolumeStatsResponse, error) {
				return node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volB, VolumePath: targetM})
			})
		}, codes.NotFound, codes.InvalidArgument),
		hc("NodeGetVolumeStats/no-path", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeGetVolumeStatsResponse, error) {
				return node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volM})
			})
		}, codes.InvalidArgument),
		hc("NodeExpandVolume/no-path", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeExpandVolumeResponse, error) {
				return node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: volM})
			})
		}, codes.InvalidArgument),
		hc("NodeExpandVolume/not-staged", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeExpandVolumeResponse, error) {
				return node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: volU, VolumePath: stageU})
			})
		}, codes.FailedPrecondition),
		hc("NodeGetInfo", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeGetInfoResponse, error) { return node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}) })
		}, codes.OK),
		hc("NodeGetCapabilities", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeGetCapabilitiesResponse, error) {
				return node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
			})
		}, codes.OK),
		hc("ControllerGetCapabilities", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerGetCapabilitiesResponse, error) {
				return ctl.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
			})
		}, codes.OK),
	)

	// GroupController: IDs, names and parameters, the same way.
	group := e.c.group
	groupIDs := hostileIDs(groupPrefix)
	groupIDs["volume-id"] = volM
	groupIDs["snapshot-id"] = snapS
	groupIDs["absent"] = groupPrefix + strings.Repeat("0", idHexLen)
	groupIDs["empty"] = ""
	for _, key := range keysSorted(groupIDs) {
		id := groupIDs[key]
		notFound, deleted := codes.NotFound, codes.OK
		if id == "" {
			notFound, deleted = codes.InvalidArgument, codes.InvalidArgument
		}
		add(
			hc("groupID="+key+"/GetVolumeGroupSnapshot", func(ctx context.Context) error {
				return rpcErr(func() (*csi.GetVolumeGroupSnapshotResponse, error) {
					return group.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: id})
				})
			}, notFound),
			hc("groupID="+key+"/DeleteVolumeGroupSnapshot", func(ctx context.Context) error {
				return rpcErr(func() (*csi.DeleteVolumeGroupSnapshotResponse, error) {
					return group.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: id, SnapshotIds: []string{snapS}})
				})
			}, deleted),
		)
	}
	createGroup := func(name string, req *csi.CreateVolumeGroupSnapshotRequest, want ...codes.Code) hostileCase {
		return hc("CreateVolumeGroupSnapshot/"+name, func(ctx context.Context) error {
			return rpcErr(func() (*csi.CreateVolumeGroupSnapshotResponse, error) {
				return group.CreateVolumeGroupSnapshot(ctx, req)
			})
		}, want...)
	}
	add(
		createGroup("empty-name", &csi.CreateVolumeGroupSnapshotRequest{SourceVolumeIds: []string{volM}}, codes.InvalidArgument),
		createGroup("10KB-name", &csi.CreateVolumeGroupSnapshotRequest{Name: long, SourceVolumeIds: []string{volM}}, codes.InvalidArgument),
		createGroup("no-volumes", &csi.CreateVolumeGroupSnapshotRequest{Name: "hostile-group"}, codes.InvalidArgument),
		createGroup("volume-twice", &csi.CreateVolumeGroupSnapshotRequest{Name: "hostile-group", SourceVolumeIds: []string{volM, volM}}, codes.InvalidArgument),
		createGroup("unknown-param", &csi.CreateVolumeGroupSnapshotRequest{Name: "hostile-group", SourceVolumeIds: []string{volM}, Parameters: map[string]string{"../x": ""}}, codes.InvalidArgument),
		createGroup("empty-volume-id", &csi.CreateVolumeGroupSnapshotRequest{Name: "hostile-group", SourceVolumeIds: []string{volM, ""}}, codes.InvalidArgument),
	)
	for _, key := range keysSorted(volIDs) {
		if id := volIDs[key]; id != "" {
			add(createGroup("volumeID="+key, &csi.CreateVolumeGroupSnapshotRequest{Name: "hostile-group", SourceVolumeIds: []string{volM, id}}, codes.NotFound))
		}
	}

	// Invalid UTF-8 cannot be marshalled into a proto3 string by a well-behaved client: send
	// raw bytes, as a hostile one would. The gRPC server refuses to decode them before the
	// driver sees them.
	for _, x := range []struct {
		method string
		field  protowire.Number
	}{
		{"/csi.v1.Controller/CreateVolume", 1},   // name
		{"/csi.v1.Controller/DeleteVolume", 1},   // volume_id
		{"/csi.v1.Controller/CreateSnapshot", 2}, // name
		{"/csi.v1.Controller/DeleteSnapshot", 1}, // snapshot_id
		{"/csi.v1.Node/NodeUnpublishVolume", 2},  // target_path
		{"/csi.v1.Node/NodeUnstageVolume", 2},    // staging_target_path
		{"/csi.v1.Node/NodeGetVolumeStats", 2},   // volume_path
		{"/csi.v1.Controller/ControllerGetVolume", 1},
	} {
		add(hc("invalid-UTF-8"+x.method, func(ctx context.Context) error {
			return rawCall(ctx, e.c.conn, x.method, x.field, "vol-\xff\xfe../../etc/passwd")
		}, codes.Internal))
	}
	// The handlers themselves, called directly with invalid UTF-8 (as another Go caller
	// could): IDs are NotFound, nothing is touched.
	bad := volumePrefix + strings.Repeat("\xff", idHexLen)
	add(
		hc("direct-invalid-UTF-8/DeleteVolume", func(ctx context.Context) error {
			return rpcErr(func() (*csi.DeleteVolumeResponse, error) {
				return td.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: bad})
			})
		}, codes.OK),
		hc("direct-invalid-UTF-8/ControllerGetVolume", func(ctx context.Context) error {
			return rpcErr(func() (*csi.ControllerGetVolumeResponse, error) {
				return td.d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: bad})
			})
		}, codes.NotFound),
		hc("direct-invalid-UTF-8/NodeUnpublishVolume", func(ctx context.Context) error {
			return rpcErr(func() (*csi.NodeUnpublishVolumeResponse, error) {
				return td.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: bad, TargetPath: victim})
			})
		}, codes.NotFound),
		hc("direct-invalid-UTF-8/CreateVolume-fsType", func(ctx context.Context) error {
			return rpcErr(func() (*csi.CreateVolumeResponse, error) {
				return td.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: caps(mountCapOf("ext4\xff"))})
			})
		}, codes.InvalidArgument),
		hc("direct-invalid-UTF-8/CreateVolume-baseImage", func(ctx context.Context) error {
			return rpcErr(func() (*csi.CreateVolumeResponse, error) {
				return td.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: caps(mountCapOf("")), Parameters: map[string]string{"baseImage": "\xff"}})
			})
		}, codes.InvalidArgument),
	)

	// Run every case against one baseline of the world.
	before := e.world(t)
	realPasswd := treeOf(t, "/etc", []string{"passwd", "shadow", "group"}, skipAllBut("/etc")...)
	names := map[string]bool{}
	for _, c := range cases {
		if names[c.name] {
			t.Fatalf("duplicate case %q", c.name)
		}
		names[c.name] = true
		t.Run(c.name, func(t *testing.T) {
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			err := c.call(cctx)
			got := status.Code(err)
			if !hasString(codeNames(c.want), got.String()) {
				t.Errorf("got %v (%v), want %v", got, err, c.want)
			}
			if d := before.diff(e.world(t)); d != "" {
				t.Errorf("the request changed the world:\n%s", d)
				before = e.world(t) // report each change once
			}
		})
	}
	if d := diffTrees(realPasswd, treeOf(t, "/etc", []string{"passwd", "shadow", "group"}, skipAllBut("/etc")...)); d != "" {
		t.Errorf("/etc changed:\n%s", d)
	}
	if entries, _ := os.ReadDir(cwd); len(entries) > 0 {
		t.Errorf("the working directory got %d entries", len(entries))
	}
	// The fixtures still work.
	if b, err := os.ReadFile(filepath.Join(targetM, "data")); err != nil || string(b) != "fixture data" {
		t.Errorf("the published volume lost its data: %q, %v", b, err)
	}
	if _, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: volB, VolumePath: targetB}); err != nil {
		t.Errorf("stats of the block fixture: %v", err)
	}
	t.Logf("%d hostile requests", len(cases))
}

func codeNames(cs []codes.Code) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.String())
	}
	return out
}

func keysSorted[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// rawCodec sends pre-encoded request bytes and decodes answers as protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return v.([]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	if m, ok := v.(proto.Message); ok {
		return proto.Unmarshal(data, m)
	}
	return nil
}
func (rawCodec) Name() string { return "proto" }

// rawCall calls method with a request whose string field is value, bytes as they are.
func rawCall(ctx context.Context, conn *grpc.ClientConn, method string, field protowire.Number, value string) error {
	req := protowire.AppendTag(nil, field, protowire.BytesType)
	req = protowire.AppendString(req, value)
	var resp []byte
	return conn.Invoke(ctx, method, req, &resp, grpc.ForceCodec(rawCodec{}))
}

// TestHostileNames creates volumes and snapshots whose CO names look like paths, IDs of
// this driver or garbage. A name is only ever hashed into an ID: each one is accepted, its
// ID is a prefix and 32 lower-case hex digits that pkg/cow takes as a name, nothing appears
// outside the store, and deleting them leaves the store as it was.
func TestHostileNames(t *testing.T) {
	td := startDriver(t)
	c := dialCSI(t, td.endpoint)
	ctx := context.Background()
	cwd := t.TempDir()
	t.Chdir(cwd)
	parent := filepath.Dir(td.root)
	world := func() (map[string]string, map[string]string) {
		return treeOf(t, filepath.Join(td.root, "store"), []string{"manifest.json"}, "locks"),
			treeOf(t, parent, nil, filepath.Base(td.root), filepath.Base(cwd))
	}
	// The store's files (manifest, lock) exist once something was made in it.
	if _, err := c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "warm-up", VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()}, CapacityRange: capacity(1<<20, 0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: volumeIDFor("warm-up")}); err != nil {
		t.Fatal(err)
	}
	storeBefore, parentBefore := world()
	volIDs := map[string]bool{}
	snapIDs := map[string]bool{}
	names := []string{"..", ".", "../../etc/passwd", "/etc", "a/b", "vol-" + strings.Repeat("a", 15) + "/" + strings.Repeat("b", 16),
		volumeIDFor("x"), snapshotIDFor("x"), "with\x00nul", "x\n", " ", "ünïcödé", strings.Repeat("n", 128)}
	for _, name := range names {
		v, err := c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()}, CapacityRange: capacity(1<<20, 0),
			Parameters: map[string]string{"csi.storage.k8s.io/pvc/name": name, "csi.storage.k8s.io/pvc/namespace": "../../etc"}})
		if err != nil {
			t.Errorf("create volume %q: %v", name, err)
			continue
		}
		id := v.Volume.VolumeId
		if !wellFormed(id, volumePrefix) || cow.ValidateName(id) != nil || volIDs[id] {
			t.Errorf("volume %q got ID %q", name, id)
		}
		volIDs[id] = true
		s, err := c.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: id,
			Parameters: map[string]string{"csi.storage.k8s.io/volumesnapshot/name": name}})
		if err != nil {
			t.Errorf("snapshot %q: %v", name, err)
			continue
		}
		sid := s.Snapshot.SnapshotId
		if !wellFormed(sid, snapshotPrefix) || cow.ValidateName(sid) != nil || snapIDs[sid] {
			t.Errorf("snapshot %q got ID %q", name, sid)
		}
		snapIDs[sid] = true
		// The same name again is the same object.
		if v2, err := c.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()}, CapacityRange: capacity(1<<20, 0)}); err != nil || v2.Volume.VolumeId != id {
			t.Errorf("create volume %q again: %v, %v", name, v2, err)
		}
	}
	st, err := cow.OpenStore(filepath.Join(td.root, "store"))
	if err != nil {
		t.Fatal(err)
	}
	vols, _ := st.Volumes()
	snaps, _ := st.Snapshots()
	if len(vols) != len(names) || len(snaps) != len(names) {
		t.Errorf("the store has %d volumes and %d snapshots for %d names", len(vols), len(snaps), len(names))
	}
	for id := range snapIDs {
		if _, err := c.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Errorf("delete snapshot %s: %v", id, err)
		}
	}
	for id := range volIDs {
		if _, err := c.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete volume %s: %v", id, err)
		}
	}
	storeAfter, parentAfter := world()
	if d := diffTrees(storeBefore, storeAfter); d != "" {
		t.Errorf("the store is not as it was:\n%s", d)
	}
	if d := diffTrees(parentBefore, parentAfter); d != "" {
		t.Errorf("the parent of the root changed:\n%s", d)
	}
	if entries, _ := os.ReadDir(cwd); len(entries) > 0 {
		t.Errorf("the working directory got %d entries", len(entries))
	}
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		t.Errorf("check: %v %v", probs, err)
	}
}

// sweepMounts reports and lazily unmounts whatever is still mounted under dir, the last
// mounted first (a later mount may hide an earlier one).
func sweepMounts(t testing.TB, dir string) {
	t.Helper()
	for pass := 0; pass < 5; pass++ {
		ms := mountsUnder(t, dir)
		if len(ms) == 0 {
			return
		}
		for i := len(ms) - 1; i >= 0; i-- {
			if pass == 0 {
				t.Errorf("left mounted: %s", ms[i])
			}
			unix.Unmount(ms[i], unix.MNT_DETACH)
		}
	}
	t.Errorf("still mounted: %v", mountsUnder(t, dir))
}
