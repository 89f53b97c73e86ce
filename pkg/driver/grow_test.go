package driver

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

func mountCap(fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// fsSize is the size statfs reports for the file system mounted at path.
func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// A file system smaller than its volume is grown when the volume is staged: a restore into a
// larger claim, and an expansion while the volume was not staged (for ext4 offline, which
// needs no CAP_SYS_RESOURCE). The data written before survives.
func TestStageGrowsFileSystem(t *testing.T) {
	td := startDriver(t)
	c := dialDriver(t, td)
	ctx := context.Background()
	for _, fsType := range []string{"ext4", "xfs"} {
		t.Run(fsType, func(t *testing.T) {
			mc := mountCap(fsType)
			const small, large = 512 << 20, 1536 << 20
			stage := func(id, name string) string {
				t.Helper()
				staging := filepath.Join(td.root, "staging-"+fsType+"-"+name)
				if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mc}); err != nil {
					t.Fatal(err)
				}
				return staging
			}
			unstage := func(id, staging string) {
				t.Helper()
				if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
					t.Fatal(err)
				}
			}
			create := func(name string, size int64, src *csi.VolumeContentSource) string {
				t.Helper()
				v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fsType + "-" + name, VolumeCapabilities: []*csi.VolumeCapability{mc},
					CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeContentSource: src})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}) })
				return v.Volume.VolumeId
			}
			checkGrown := func(staging, what string) {
				t.Helper()
				// file system overhead (journal, metadata) stays well below 10%
				if got := fsSize(t, staging); got < large*9/10 {
					t.Errorf("%s: file system of %d MiB on a %d MiB volume", what, got>>20, large>>20)
				}
				if b, err := os.ReadFile(filepath.Join(staging, "data")); err != nil || string(b) != "kept" {
					t.Errorf("%s: data %q, %v", what, b, err)
				}
			}

			src := create("src", small, nil)
			staging := stage(src, "src")
			if got := fsSize(t, staging); got > small {
				t.Fatalf("new file system of %d MiB on a %d MiB volume", got>>20, small>>20)
			}
			if err := os.WriteFile(filepath.Join(staging, "data"), []byte("kept"), 0o644); err != nil {
				t.Fatal(err)
			}
			syncFS(t, staging)
			snap, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fsType + "-snap", SourceVolumeId: src})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId}) })
			unstage(src, staging)

			restore := create("restore", large, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}})
			staging = stage(restore, "restore")
			checkGrown(staging, "restore into a larger volume")
			unstage(restore, staging)

			if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: src, VolumeCapability: mc,
				CapacityRange: &csi.CapacityRange{RequiredBytes: large}}); err != nil {
				t.Fatal(err)
			}
			staging = stage(src, "expanded")
			checkGrown(staging, "expansion of an unstaged volume")
			unstage(src, staging)
		})
	}
}

func syncFS(t *testing.T, path string) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		t.Fatal(err)
	}
}
