package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, c := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{
			Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: c}},
		})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.cfg.NodeID,
		MaxVolumesPerNode:  d.cfg.MaxVolumes,
		AccessibleTopology: d.topology()[0],
	}, nil
}

// existingVolume validates a request's volume ID and describes the volume.
func (d *Driver) existingVolume(id string) (*cow.Info, error) {
	return d.existing(id, checkVolumeID, "volume")
}

// existingSnapshot validates a request's snapshot ID and describes the snapshot.
func (d *Driver) existingSnapshot(id string) (*cow.Info, error) {
	return d.existing(id, checkSnapshotID, "snapshot")
}

// HasSnapshot reports whether id names a snapshot in this node's store.
func (d *Driver) HasSnapshot(id string) bool {
	_, err := d.existingSnapshot(id)
	return err == nil
}

func (d *Driver) existing(id string, check func(string) error, what string) (*cow.Info, error) {
	if err := check(id); err != nil {
		return nil, err
	}
	info, err := d.store.Info(id)
	if err != nil {
		return nil, status.Errorf(codeOf(err), "%s %s: %v", what, id, err)
	}
	return info, nil
}

// checkCapability validates the one capability a node request carries.
func checkCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return status.Error(codes.InvalidArgument, "volume capability is required")
	}
	return checkCapabilities([]*csi.VolumeCapability{c})
}

func readOnlyMode(c *csi.VolumeCapability) bool {
	return c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
}

// NodeStageVolume attaches the volume to a loop device and, for a mount volume, formats it
// (if it has no file system yet) and mounts it at the staging path.
func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	if err := required("volume ID", req.VolumeId, "staging target path", req.StagingTargetPath); err != nil {
		return nil, err
	}
	if err := checkCapability(req.VolumeCapability); err != nil {
		return nil, err
	}
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	if err := checkPath("staging target path", req.StagingTargetPath, true); err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	prev, wasAttached, err := d.attached(req.VolumeId)
	if err != nil {
		return nil, err
	}
	readOnly := readOnlyMode(req.VolumeCapability)
	if wasAttached && prev.ReadOnly != readOnly {
		return nil, status.Errorf(codes.AlreadyExists, "volume %s is staged with readOnly=%v", req.VolumeId, prev.ReadOnly)
	}
	a, err := d.present.Attach(req.VolumeId, blockdev.AttachOptions{ReadOnly: readOnly, Presentation: info.Labels[labelPresent]})
	if err != nil {
		return nil, status.Errorf(codeOf(err), "attach %s: %v", req.VolumeId, err)
	}
	// A stage that fails leaves nothing attached: the CO does not unstage what failed.
	fail := func(err error) (*csi.NodeStageVolumeResponse, error) {
		if !wasAttached {
			if derr := d.present.Detach(req.VolumeId); derr != nil {
				err = status.Errorf(status.Code(err), "%s (and detaching again: %v)", status.Convert(err).Message(), derr)
			}
		}
		return nil, err
	}
	m := req.VolumeCapability.GetMount()
	if m == nil {
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if notMnt, err := d.notMountPoint(req.StagingTargetPath); err != nil {
		return fail(err)
	} else if !notMnt {
		if !onDevice(req.StagingTargetPath, a.Device) {
			return fail(status.Errorf(codes.FailedPrecondition, "staging path %s holds another file system", req.StagingTargetPath))
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}
	fsType, _ := fsTypeOf(m)
	opts := append([]string(nil), m.MountFlags...)
	if fsType == "xfs" {
		opts = append(opts, "nouuid") // clones and restores carry their source's UUID
	}
	if readOnly {
		opts = append(opts, "ro")
	}
	if err := os.MkdirAll(req.StagingTargetPath, 0o750); err != nil {
		return fail(status.Errorf(codes.Internal, "staging path: %v", err))
	}
	mounts, err := mountsOf(a.Device)
	if err != nil {
		return fail(status.Errorf(codes.Internal, "%v", err))
	}
	// Only a file system that was there before staging can be smaller than its volume (one
	// formatted now has the device's size); a device mounted elsewhere is in use: never check
	// or resize it from under that user.
	format := ""
	if !readOnly && len(mounts) == 0 {
		if format, err = diskFormat(d.exec, a.Device); err == nil {
			err = growUnmountedExt(d.exec, a.Device, format)
		}
		if err != nil {
			return fail(status.Errorf(codes.Internal, "grow the file system of %s: %v", req.VolumeId, err))
		}
	}
	if err := d.mounter.FormatAndMount(a.Device, req.StagingTargetPath, fsType, opts); err != nil {
		return fail(status.Errorf(codes.Internal, "format and mount %s at %s: %v", a.Device, req.StagingTargetPath, err))
	}
	if err := growMounted(d.exec, format, a.Device, req.StagingTargetPath); err != nil {
		if uerr := mount.CleanupMountPoint(req.StagingTargetPath, d.mounter, true); uerr != nil {
			err = fmt.Errorf("%w (and unmounting again: %v)", err, uerr)
		}
		return fail(status.Errorf(codes.Internal, "grow the file system of %s: %v", req.VolumeId, err))
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// notMountPoint reports whether path is not a mount point; a missing path is not one.
func (d *Driver) notMountPoint(path string) (bool, error) {
	notMnt, err := d.mounter.IsLikelyNotMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		if mount.IsCorruptedMnt(err) {
			return false, nil
		}
		return false, status.Errorf(codes.Internal, "check mount point %s: %v", path, err)
	}
	return notMnt, nil
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if err := required("staging target path", req.StagingTargetPath); err != nil {
		return nil, err
	}
	if err := checkVolumeID(req.VolumeId); err != nil {
		return nil, err
	}
	if err := checkPath("staging target path", req.StagingTargetPath, false); err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	// Detaching a device that is still published would pull it from under the pod.
	if a, ok, err := d.attached(req.VolumeId); err != nil {
		return nil, err
	} else if ok {
		mounts, err := mountsOf(a.Device)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		for _, m := range mounts {
			if m != filepath.Clean(req.StagingTargetPath) {
				return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still mounted at %s", req.VolumeId, m)
			}
		}
	}
	if err := mount.CleanupMountPoint(req.StagingTargetPath, d.mounter, true); err != nil {
		return nil, status.Errorf(codes.Internal, "unmount %s: %v", req.StagingTargetPath, err)
	}
	if err := d.present.Detach(req.VolumeId); err != nil {
		return nil, status.Errorf(codes.Internal, "detach %s: %v", req.VolumeId, err)
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged file system, or the loop device itself for a
// block volume, at the target path.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := required("volume ID", req.VolumeId, "target path", req.TargetPath, "staging target path", req.StagingTargetPath); err != nil {
		return nil, err
	}
	if err := checkCapability(req.VolumeCapability); err != nil {
		return nil, err
	}
	if _, err := d.existingVolume(req.VolumeId); err != nil {
		return nil, err
	}
	if err := checkPath("target path", req.TargetPath, req.VolumeCapability.GetMount() != nil); err != nil {
		return nil, err
	}
	if err := checkPath("staging target path", req.StagingTargetPath, true); err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	a, ok, err := d.attached(req.VolumeId)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged on node %s", req.VolumeId, d.cfg.NodeID)
	}
	// Whatever is at the staging path is bind-mounted into the pod: it must be the volume.
	if req.VolumeCapability.GetMount() != nil && !onDevice(req.StagingTargetPath, a.Device) {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", req.VolumeId, req.StagingTargetPath)
	}
	if notMnt, err := d.notMountPoint(req.TargetPath); err != nil {
		return nil, err
	} else if !notMnt {
		if !onDevice(req.TargetPath, a.Device) {
			return nil, status.Errorf(codes.FailedPrecondition, "target path %s holds something else", req.TargetPath)
		}
		if err := samePublishMode(req); err != nil {
			return nil, err
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if req.VolumeCapability.AccessMode.Mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		mounts, err := mountsOf(a.Device)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		for _, m := range mounts {
			if m != filepath.Clean(req.StagingTargetPath) && m != filepath.Clean(req.TargetPath) {
				return nil, status.Errorf(codes.FailedPrecondition, "volume %s is single-writer and already published at %s", req.VolumeId, m)
			}
		}
	}
	opts := []string{"bind"}
	if req.Readonly || readOnlyMode(req.VolumeCapability) {
		opts = append(opts, "ro")
	}
	source := req.StagingTargetPath
	if req.VolumeCapability.GetBlock() != nil {
		source = a.Device
		if err := os.MkdirAll(filepath.Dir(req.TargetPath), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "target path: %v", err)
		}
		f, err := os.OpenFile(req.TargetPath, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "target path: %v", err)
		}
		f.Close()
	} else {
		opts = append(opts, req.VolumeCapability.GetMount().GetMountFlags()...)
		if err := os.MkdirAll(req.TargetPath, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "target path: %v", err)
		}
	}
	if err := d.mounter.Mount(source, req.TargetPath, "", opts); err != nil {
		return nil, status.Errorf(codes.Internal, "bind %s at %s: %v", source, req.TargetPath, err)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if err := required("target path", req.TargetPath); err != nil {
		return nil, err
	}
	if err := checkVolumeID(req.VolumeId); err != nil {
		return nil, err
	}
	if err := checkPath("target path", req.TargetPath, false); err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	if err := mount.CleanupMountPoint(req.TargetPath, d.mounter, true); err != nil {
		return nil, status.Errorf(codes.Internal, "unmount %s: %v", req.TargetPath, err)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if err := required("volume path", req.VolumePath); err != nil {
		return nil, err
	}
	if _, err := d.existingVolume(req.VolumeId); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Stat(req.VolumePath, &st); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume path %s: %v", req.VolumePath, err)
	}
	if a, ok, err := d.attached(req.VolumeId); err != nil {
		return nil, err
	} else if !ok || !onDevice(req.VolumePath, a.Device) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not at %s", req.VolumeId, req.VolumePath)
	}
	resp := &csi.NodeGetVolumeStatsResponse{}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		size, err := deviceSize(req.VolumePath)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		resp.Usage = []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}}
		return resp, nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(req.VolumePath, &fs); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", req.VolumePath, err)
	}
	bs := fs.Bsize
	resp.Usage = []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(fs.Blocks) * bs, Available: int64(fs.Bavail) * bs, Used: int64(fs.Blocks-fs.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(fs.Files), Available: int64(fs.Ffree), Used: int64(fs.Files - fs.Ffree)},
	}
	return resp, nil
}

// checkPath refuses a staging or target path that a mount at it, or the clean-up of it,
// would turn against something else: a relative path (it resolves against the driver's
// working directory), a symbolic link (a mount follows it), a path below a file, and a file
// with data (a path that is not a mount point is removed by the clean-up, and this driver
// only ever makes directories and the empty file of a block target). With dir, an
// existing path must be a directory.
func checkPath(what, p string, dir bool) error {
	if err := required(what, p); err != nil {
		return err
	}
	if !filepath.IsAbs(p) {
		return status.Errorf(codes.InvalidArgument, "%s %q is not absolute", what, truncate(p))
	}
	fi, err := os.Lstat(p)
	switch {
	case errors.Is(err, os.ErrNotExist) || mount.IsCorruptedMnt(err):
		return nil
	case err != nil:
		return status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
	case fi.Mode()&os.ModeSymlink != 0:
		return status.Errorf(codes.InvalidArgument, "%s %s is a symbolic link", what, p)
	case fi.Mode().IsRegular() && fi.Size() > 0:
		return status.Errorf(codes.InvalidArgument, "%s %s is a file with data, not a path this driver made", what, p)
	case dir && !fi.IsDir():
		return status.Errorf(codes.InvalidArgument, "%s %s is not a directory", what, p)
	}
	return nil
}

// samePublishMode fails with AlreadyExists when the volume is published at req's target
// read-only and req asks for read-write, or the other way round. A target that is read-only
// because its staged file system is (a read-only stage) is what a read-write request gets.
func samePublishMode(req *csi.NodePublishVolumeRequest) error {
	want := req.Readonly || readOnlyMode(req.VolumeCapability)
	ro, err := mountedReadOnly(req.TargetPath)
	if err != nil || ro == want {
		return err
	}
	if ro && req.VolumeCapability.GetMount() != nil {
		stageRO, err := mountedReadOnly(req.StagingTargetPath)
		if err != nil || stageRO {
			return err
		}
	}
	return status.Errorf(codes.AlreadyExists, "volume %s is published at %s with readOnly=%v", req.VolumeId, req.TargetPath, ro)
}

// mountedReadOnly reports whether the mount that holds path is read-only.
func mountedReadOnly(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, status.Errorf(codes.Internal, "statfs %s: %v", path, err)
	}
	return st.Flags&unix.ST_RDONLY != 0, nil
}

// onDevice reports whether path lies on block device dev: in a file system mounted from it,
// or the device node itself (a block volume's target).
func onDevice(path, dev string) bool {
	var st, d unix.Stat_t
	if unix.Stat(dev, &d) != nil || unix.Stat(path, &st) != nil {
		return false
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return st.Rdev == d.Rdev
	}
	return st.Dev == d.Rdev
}

// mountsOf returns where device dev is mounted: its file system (staged, and bind-mounted
// by every publish) or, for a block volume, bind mounts of the device node itself.
func mountsOf(dev string) ([]string, error) {
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", dev, err)
	}
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, mi := range infos {
		if uint32(mi.Major) == unix.Major(st.Rdev) && uint32(mi.Minor) == unix.Minor(st.Rdev) ||
			mi.FsType == "devtmpfs" && mi.Root == "/"+filepath.Base(dev) {
			out = append(out, filepath.Clean(mi.MountPoint))
		}
	}
	return out, nil
}

func deviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	return int64(n), err
}

// NodeExpandVolume grows the file system of a mounted volume to its device's size; the
// device already has it (ControllerExpandVolume resized the attached loop device).
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	if err := required("volume path", req.VolumePath); err != nil {
		return nil, err
	}
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	a, ok, err := d.attached(req.VolumeId)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged on node %s", req.VolumeId, d.cfg.NodeID)
	}
	if _, err := os.Stat(req.VolumePath); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume path %s: %v", req.VolumePath, err)
	}
	if !onDevice(req.VolumePath, a.Device) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not at %s", req.VolumeId, req.VolumePath)
	}
	if req.VolumeCapability.GetBlock() == nil {
		if ok, err := isBlockDevice(req.VolumePath); err == nil && !ok {
			if _, err := mount.NewResizeFs(d.exec).Resize(a.Device, req.VolumePath); err != nil {
				if !hasCapability(capSysResource) {
					// Growing a mounted ext4 (EXT4_IOC_RESIZE_FS) needs it; xfs_growfs does not.
					return nil, status.Errorf(codes.FailedPrecondition, "grow the file system of %s: %v (the node plugin lacks CAP_SYS_RESOURCE, which growing a mounted ext4 needs: run it privileged)", req.VolumeId, err)
				}
				return nil, status.Errorf(codes.Internal, "grow the file system of %s: %v", req.VolumeId, err)
			}
		}
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: info.Size}, nil
}

func isBlockDevice(path string) (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return false, err
	}
	return st.Mode&unix.S_IFMT == unix.S_IFBLK, nil
}

func (d *Driver) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: d.volumeHealth(info)}, nil
}

// NodeGetStorageHealth reports the store and the presentation server of this node.
func (d *Driver) NodeGetStorageHealth(ctx context.Context, req *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	resp := &csi.NodeGetStorageHealthResponse{}
	if err := probeWritable(d.store.Dir()); err != nil {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_DEGRADED, Reason: "StoreNotWritable", Message: err.Error()})
	}
	if _, err := d.present.List(); err != nil {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_UNREACHABLE, Reason: "ServerUnreachable", Message: err.Error()})
	}
	return resp, nil
}

// capSysResource is CAP_SYS_RESOURCE's number.
const capSysResource = 24

// hasCapability reports whether the process has capability c in its effective set.
func hasCapability(c uint) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && n&(1<<c) != 0
		}
	}
	return false
}
