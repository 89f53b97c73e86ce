package driver

import (
	"context"
	"encoding/hex"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
	"github.com/rawcow/csi-rawcow/pkg/images"
)

// noPresentation is a presentation with nothing attached, for controller requests that do
// not attach: the fuzz targets run the real driver over a real store without root, FUSE or
// loop devices. Any other method panics (the embedded interface is nil): no request the
// targets send may reach one.
type noPresentation struct{ blockdev.Service }

func (noPresentation) Detach(string) error                  { return nil }
func (noPresentation) List() ([]blockdev.Attachment, error) { return nil, nil }

// fuzzDriver is a driver over a store and an image store (one 1 MiB image, "base") in a
// temp directory, with no presentation.
type fuzzDriver struct {
	d     *Driver
	store *cow.Store
	root  string
}

func newFuzzDriver(t testing.TB) *fuzzDriver {
	t.Helper()
	root := t.TempDir()
	st, err := cow.OpenStore(filepath.Join(root, "store"))
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := images.Open(filepath.Join(root, "images"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "images", "base.raw"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{NodeID: "node-1"}, st, imgs, noPresentation{})
	if err != nil {
		t.Fatal(err)
	}
	return &fuzzDriver{d: d, store: st, root: root}
}

// rootEntries lists the fuzz driver's root and its parent: nothing may appear beside the
// store and the image store.
func (fd *fuzzDriver) rootEntries(t testing.TB) string {
	var names []string
	for _, dir := range []string{fd.root, filepath.Dir(fd.root)} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			names = append(names, dir+"/"+e.Name())
		}
	}
	return strings.Join(names, "\n")
}

// checkAcceptedID asserts what an ID the driver takes must be: the prefix and exactly 32
// lower-case hex digits, no "/" and no "..", and a name the engine accepts.
func checkAcceptedID(t *testing.T, id, prefix string) {
	t.Helper()
	hexPart, ok := strings.CutPrefix(id, prefix)
	if !ok || len(hexPart) != idHexLen {
		t.Fatalf("accepted %q: not %q and %d characters", id, prefix, idHexLen)
	}
	if b, err := hex.DecodeString(hexPart); err != nil || hex.EncodeToString(b) != hexPart {
		t.Fatalf("accepted %q: %q is not lower-case hex", id, hexPart)
	}
	if strings.Contains(id, "/") || strings.Contains(id, "..") {
		t.Fatalf("accepted %q: it has a / or ..", id)
	}
	if err := cow.ValidateName(id); err != nil {
		t.Fatalf("accepted %q, the engine refuses it: %v", id, err)
	}
}

var idPrefixes = []string{volumePrefix, snapshotPrefix, groupPrefix}

// FuzzVolumeID feeds arbitrary strings to the ID checks and to the requests that take an
// ID. An accepted ID is exactly a prefix and 32 lower-case hex digits, never holds "/" or
// "..", and pkg/cow takes it as a name; a refused one is InvalidArgument when empty and
// NotFound otherwise; no ID is accepted as two kinds. Against the driver: deleting,
// describing or expanding by an arbitrary ID never touches a volume that has another ID,
// and no request answers Internal or Unknown.
func FuzzVolumeID(f *testing.F) {
	hex32 := strings.Repeat("0123456789abcdef", 2)
	for _, s := range []string{
		"", "..", ".", "/", "../../etc/passwd", "/etc", "a/b", "vol-", "snap-", "group-",
		"vol-" + hex32, "snap-" + hex32, "group-" + hex32, "VOL-" + hex32, "vol-" + strings.ToUpper(hex32),
		"vol-" + hex32[:15] + "/" + hex32[16:], "vol-../" + hex32[3:], "vol-" + hex32[:31], "vol-" + hex32 + "0",
		"vol-" + hex32[:16] + "\x00" + hex32[17:], "vol-" + strings.Repeat("\xff", 32), "vol-" + strings.Repeat("g", 32),
		"vol-" + strings.Repeat("a", 10<<10), " vol-" + hex32, "vol-" + hex32 + "\n", "snap-vol-" + hex32[9:],
		volumeIDFor("pvc-1"), snapshotIDFor("snapshot-1"), "vol-" + hex32[:30] + "é",
	} {
		f.Add(s)
	}
	// One driver per fuzzing process, in f's temp directory (an iteration's is removed
	// when the iteration ends).
	fd := newFuzzDriver(f)
	r, err := fd.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "fixture", VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()}, CapacityRange: capacity(1<<20, 0)})
	if err != nil {
		f.Fatal(err)
	}
	fixture := r.Volume.VolumeId
	f.Fuzz(func(t *testing.T, id string) {
		for _, prefix := range idPrefixes {
			err := checkID(id, prefix, "x")
			if wellFormed(id, prefix) != (err == nil) {
				t.Fatalf("wellFormed(%q, %q) disagrees with checkID: %v", id, prefix, err)
			}
			switch {
			case err == nil:
				checkAcceptedID(t, id, prefix)
				for _, other := range idPrefixes {
					if other != prefix && wellFormed(id, other) {
						t.Fatalf("%q is a %q and a %q ID", id, prefix, other)
					}
				}
			case id == "" && status.Code(err) != codes.InvalidArgument, id != "" && status.Code(err) != codes.NotFound:
				t.Fatalf("checkID(%q, %q): %v", id, prefix, err)
			}
			// Any string, as a CO name, hashes to an ID of the kind.
			checkAcceptedID(t, deriveID(prefix, id), prefix)
		}
		if (checkVolumeID(id) == nil) != wellFormed(id, volumePrefix) || (checkSnapshotID(id) == nil) != wellFormed(id, snapshotPrefix) {
			t.Fatalf("checkVolumeID/checkSnapshotID(%q) disagree with wellFormed", id)
		}

		// The real driver over a real store, one volume in it.
		if id == fixture {
			return
		}
		ctx := context.Background()
		for what, err := range map[string]error{
			"DeleteVolume": rpcErr(func() (*csi.DeleteVolumeResponse, error) {
				return fd.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			}),
			"DeleteSnapshot": rpcErr(func() (*csi.DeleteSnapshotResponse, error) {
				return fd.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
			}),
			"ControllerGetVolume": rpcErr(func() (*csi.ControllerGetVolumeResponse, error) {
				return fd.d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			}),
			"GetSnapshot": rpcErr(func() (*csi.GetSnapshotResponse, error) {
				return fd.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id})
			}),
			"ControllerExpandVolume": rpcErr(func() (*csi.ControllerExpandVolumeResponse, error) {
				return fd.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: capacity(2<<20, 0)})
			}),
			"CreateVolume-from-volume": rpcErr(func() (*csi.CreateVolumeResponse, error) {
				return fd.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{blockCapOf()},
					VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}})
			}),
		} {
			switch c := status.Code(err); c {
			case codes.OK, codes.InvalidArgument, codes.NotFound:
				if c == codes.OK && what != "DeleteVolume" && what != "DeleteSnapshot" {
					t.Fatalf("%s(%q) succeeded", what, id)
				}
			default:
				t.Fatalf("%s(%q): %v", what, id, err)
			}
		}
		vols, err := fd.store.Volumes()
		if err != nil || len(vols) != 1 || vols[0] != fixture {
			t.Fatalf("after requests with %q the store has %v (%v), want only %s", id, vols, err, fixture)
		}
	})
}

// FuzzParams feeds arbitrary StorageClass and snapshot parameters, names and capacity
// ranges to the parsing and to CreateVolume of the real driver over a real store.
// parseParams accepts only baseImage (with an image name as its value) and keys under
// csi.storage.k8s.io/; requestedSize returns a block-aligned size within the range or
// InvalidArgument (negative) or OutOfRange; CreateVolume either makes exactly the volume
// volumeIDFor(name), sized within the range, which DeleteVolume removes again, or fails
// with a code the spec gives for bad input and leaves the store empty. Nothing appears
// beside the store.
func FuzzParams(f *testing.F) {
	type seed struct {
		name, k1, v1, k2, v2 string
		required, limit      int64
		block                bool
	}
	for _, s := range []seed{
		{"pvc-1", "baseImage", "base", "csi.storage.k8s.io/pvc/name", "pvc-1", 0, 0, false},
		{"pvc-1", "baseImage", "../x", "", "", 1 << 20, 0, true},
		{"pvc-1", "baseImage", "/abs/path", "", "", 0, 0, true},
		{"pvc-1", "baseImage", "not-in-store", "", "", 0, 0, true},
		{"pvc-1", "baseimage", "base", "", "", 0, 0, true},
		{"pvc-1", "csi.storage.k8s.io/", "x", "csi.storage.k8s.io", "x", 0, 0, true},
		{"pvc-1", "fsType", "ext4", "", "", 0, 0, false},
		{"..", "", "", "", "", -1, 0, true},
		{"../../etc/passwd", "", "", "", "", 10 << 20, 5 << 20, true},
		{strings.Repeat("n", 129), "", "", "", "", 1 << 62, 0, true},
		{"a\x00b", "", "", "", "", math.MaxInt64, 0, true},
		{"x", "", "", "", "", math.MaxInt64 - 4095, math.MaxInt64, true},
		{"x", "", "", "", "", 0, 1, true},
		{"x", "", "", "", "", 1<<20 + 1, 0, false},
		{"x", "baseImage", "base", "", "", 0, 512 << 10, true},
		{"x", "\xff", "\xff", "", "", 0, 0, true},
	} {
		f.Add(s.name, s.k1, s.v1, s.k2, s.v2, s.required, s.limit, s.block)
	}
	fd := newFuzzDriver(f)
	entries := fd.rootEntries(f)
	f.Fuzz(func(t *testing.T, name, k1, v1, k2, v2 string, required, limit int64, block bool) {
		params := map[string]string{}
		if k1 != "" || v1 != "" {
			params[k1] = v1
		}
		if k2 != "" || v2 != "" {
			params[k2] = v2
		}
		vp, err := parseParams(params)
		if err == nil {
			for k, v := range params {
				switch {
				case k == paramBaseImage:
					if v != "" && cow.ValidateName(v) != nil {
						t.Fatalf("parseParams accepted the image name %q", v)
					}
				case strings.HasPrefix(k, "csi.storage.k8s.io/"):
				default:
					t.Fatalf("parseParams accepted the key %q", k)
				}
			}
			if vp.BaseImage != params[paramBaseImage] {
				t.Fatalf("parseParams: base image %q from %v", vp.BaseImage, params)
			}
		} else if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("parseParams(%v): %v", params, err)
		}
		// Snapshot parameters: only sidecar keys.
		for k := range params {
			if isSidecarKey(k) != (strings.HasPrefix(k, "csi.storage.k8s.io/") && len(k) > len("csi.storage.k8s.io/")) {
				t.Fatalf("isSidecarKey(%q) = %v", k, isSidecarKey(k))
			}
		}
		r := capacity(required, limit)
		size, err := requestedSize(r, minVolumeSize, defaultVolumeSize)
		switch {
		case err == nil:
			if size < minVolumeSize || size%cow.BlockSize != 0 || size < required || limit > 0 && size > limit {
				t.Fatalf("requestedSize(%d, %d) = %d", required, limit, size)
			}
		case required < 0 || limit < 0:
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("requestedSize(%d, %d): %v", required, limit, err)
			}
		case status.Code(err) != codes.OutOfRange:
			t.Fatalf("requestedSize(%d, %d): %v", required, limit, err)
		case limit == 0 && required <= math.MaxInt64-cow.BlockSize+1:
			t.Fatalf("requestedSize(%d, %d) refused a satisfiable range: %v", required, limit, err)
		}

		// The full request against the real driver.
		c := blockCapOf()
		if !block {
			c = mountCapOf("")
		}
		ctx := context.Background()
		resp, err := fd.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params,
			CapacityRange: r, VolumeCapabilities: []*csi.VolumeCapability{c}})
		if err == nil {
			id := resp.Volume.VolumeId
			checkAcceptedID(t, id, volumePrefix)
			if id != volumeIDFor(name) {
				t.Fatalf("volume %q got ID %s, want %s", name, id, volumeIDFor(name))
			}
			if n := resp.Volume.CapacityBytes; n < required || limit > 0 && n > limit || n%cow.BlockSize != 0 {
				t.Fatalf("volume of %d bytes for [%d, %d]", n, required, limit)
			}
			if vols, _ := fd.store.Volumes(); len(vols) != 1 || vols[0] != id {
				t.Fatalf("store volumes %v after creating %s", vols, id)
			}
			if _, err := fd.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Fatalf("delete %s: %v", id, err)
			}
		} else {
			switch status.Code(err) {
			case codes.InvalidArgument, codes.OutOfRange:
			case codes.FailedPrecondition: // a well-formed image name that is not in the store
				if img := params[paramBaseImage]; img == "" || img == "base" || cow.ValidateName(img) != nil {
					t.Fatalf("create %q with %v: %v", name, params, err)
				}
			default:
				t.Fatalf("create %q with %v [%d, %d]: %v", name, params, required, limit, err)
			}
		}
		if vols, err := fd.store.Volumes(); err != nil || len(vols) != 0 {
			t.Fatalf("store volumes %v (%v) at the end", vols, err)
		}
		if e := fd.rootEntries(t); e != entries {
			t.Fatalf("entries changed:\n%s\nto\n%s", entries, e)
		}
	})
}
