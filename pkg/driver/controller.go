package driver

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

const (
	defaultVolumeSize = 1 << 30
	minVolumeSize     = 1 << 20
	// mkfs.xfs refuses file systems smaller than this.
	minXFSVolumeSize = 300 << 20
)

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, c := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_MODIFY_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_READONLY,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{
			Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: c}},
		})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCapabilities accepts single-node access modes with a mount (ext4, xfs) or block
// access type. Volumes are node-local: multi-node modes are refused.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, c := range caps {
		if c == nil || c.AccessMode == nil {
			return status.Error(codes.InvalidArgument, "volume capability without an access mode")
		}
		switch c.AccessMode.Mode {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
		default:
			return status.Errorf(codes.InvalidArgument, "access mode %s is not supported: csi-rawcow volumes are local to one node", c.AccessMode.Mode)
		}
		switch at := c.AccessType.(type) {
		case *csi.VolumeCapability_Block:
		case *csi.VolumeCapability_Mount:
			if _, err := fsTypeOf(at.Mount); err != nil {
				return err
			}
		default:
			return status.Error(codes.InvalidArgument, "volume capability needs a block or mount access type")
		}
	}
	return nil
}

// fsTypeOf returns the file system a mount capability asks for, ext4 by default.
func fsTypeOf(m *csi.VolumeCapability_MountVolume) (string, error) {
	switch fs := m.GetFsType(); fs {
	case "":
		return "ext4", nil
	case "ext4", "xfs":
		return fs, nil
	default:
		return "", status.Errorf(codes.InvalidArgument, "file system %q is not supported (ext4, xfs)", truncate(fs))
	}
}

// requestedSize picks the size for a capacity range: at least required and min, at most
// limit, block-aligned.
func requestedSize(r *csi.CapacityRange, min, fallback int64) (int64, error) {
	req, limit := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || limit < 0 {
		return 0, status.Error(codes.InvalidArgument, "negative capacity")
	}
	size := req
	if size == 0 {
		size = fallback
		if limit > 0 && limit < size {
			size = limit
		}
	}
	size = max(size, min)
	if size > math.MaxInt64-cow.BlockSize+1 {
		return 0, status.Errorf(codes.OutOfRange, "%d bytes is more than any volume can have", size)
	}
	size = (size + cow.BlockSize - 1) / cow.BlockSize * cow.BlockSize
	if limit > 0 && size > limit {
		return 0, status.Errorf(codes.OutOfRange, "a volume needs %d bytes; the limit is %d", size, limit)
	}
	return size, nil
}

func (d *Driver) topology() []*csi.Topology {
	return []*csi.Topology{{Segments: map[string]string{TopologyKey: d.cfg.NodeID}}}
}

// servesTopology reports whether this node can satisfy accessibility requirements.
func (d *Driver) servesTopology(req *csi.TopologyRequirement) bool {
	if req == nil || len(req.Requisite) == 0 && len(req.Preferred) == 0 {
		return true
	}
	for _, t := range append(req.Requisite, req.Preferred...) {
		if v, ok := t.GetSegments()[TopologyKey]; ok && v == d.cfg.NodeID {
			return true
		}
	}
	return len(req.Requisite) == 0
}

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.Name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name is required")
	}
	if err := checkNameLen(req.Name); err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.VolumeCapabilities); err != nil {
		return nil, err
	}
	params, err := parseParams(req.Parameters)
	if err != nil {
		return nil, err
	}
	if p, err := parseMutable(req.MutableParameters); err != nil {
		return nil, err
	} else if p != "" {
		params.Presentation = p
	}
	minSize := int64(minVolumeSize)
	for _, c := range req.VolumeCapabilities {
		if fs, _ := fsTypeOf(c.GetMount()); c.GetMount() != nil && fs == "xfs" {
			minSize = minXFSVolumeSize
		}
	}
	size, err := requestedSize(req.CapacityRange, minSize, defaultVolumeSize)
	if err != nil {
		return nil, err
	}
	if !d.servesTopology(req.AccessibilityRequirements) {
		return nil, status.Errorf(codes.ResourceExhausted, "node %s is not in the requested topology", d.cfg.NodeID)
	}
	var srcKind, srcID string
	if src := req.VolumeContentSource; src != nil {
		switch {
		case src.GetSnapshot() != nil:
			srcKind, srcID = "snapshot", src.GetSnapshot().SnapshotId
			err = checkSnapshotID(srcID)
		case src.GetVolume() != nil:
			srcKind, srcID = "volume", src.GetVolume().VolumeId
			err = checkVolumeID(srcID)
		default:
			err = status.Error(codes.InvalidArgument, "unknown volume content source")
		}
		if err != nil {
			return nil, err
		}
		if params.BaseImage != "" {
			return nil, status.Error(codes.InvalidArgument, "a volume from a snapshot or a volume cannot also name a base image")
		}
	}
	id := volumeIDFor(req.Name)
	defer d.locks.lock(id)()
	labels := map[string]string{labelName: req.Name, labelParams: params.canonical(),
		labelSource: sourceLabel(srcKind, srcID), labelRequired: formatInt(size), labelPresent: params.Presentation}

	info, err := d.store.Info(id)
	switch {
	case err == nil:
		if err := d.matchExisting(info, labels, req.CapacityRange); err != nil {
			return nil, err
		}
	case errors.Is(err, cow.ErrNotFound):
		if info, err = d.createVolume(id, size, req.CapacityRange, params, srcKind, srcID, labels); err != nil {
			return nil, err
		}
	default:
		return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:           id,
		CapacityBytes:      info.Size,
		ContentSource:      req.VolumeContentSource,
		AccessibleTopology: d.topology(),
	}}, nil
}

// matchExisting answers a repeated CreateVolume: the same request gets the same volume,
// finishing a grow a crash interrupted; anything else is AlreadyExists.
func (d *Driver) matchExisting(info *cow.Info, labels map[string]string, r *csi.CapacityRange) error {
	for _, k := range []string{labelParams, labelSource} {
		if info.Labels[k] != labels[k] {
			return status.Errorf(codes.AlreadyExists, "volume %q exists with other %s", labels[labelName], k)
		}
	}
	if info.Size < r.GetRequiredBytes() || r.GetLimitBytes() > 0 && info.Size > r.GetLimitBytes() {
		if info.Labels[labelRequired] == labels[labelRequired] && info.Size < r.GetRequiredBytes() {
			want, _ := strconv.ParseInt(labels[labelRequired], 10, 64)
			if err := d.present.Resize(info.Name, want); err != nil {
				return status.Errorf(codes.Internal, "finish creating %s: %v", info.Name, err)
			}
			info.Size = want
			return nil
		}
		return status.Errorf(codes.AlreadyExists, "volume %q exists with %d bytes, outside the requested range", labels[labelName], info.Size)
	}
	return nil
}

func (d *Driver) createVolume(id string, size int64, r *csi.CapacityRange, params volumeParams, srcKind, srcID string, labels map[string]string) (*cow.Info, error) {
	var err error
	switch {
	case srcKind != "":
		src, ierr := d.store.Info(srcID)
		if errors.Is(ierr, cow.ErrNotFound) {
			return nil, status.Errorf(codes.NotFound, "%s %s does not exist", srcKind, srcID)
		}
		if ierr != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", srcKind, srcID, ierr)
		}
		if r.GetLimitBytes() > 0 && src.Size > r.GetLimitBytes() {
			return nil, status.Errorf(codes.OutOfRange, "the %s has %d bytes, more than the limit %d", srcKind, src.Size, r.GetLimitBytes())
		}
		if err = d.present.Clone(srcID, id, labels); err == nil && size > src.Size && r.GetRequiredBytes() > src.Size {
			err = d.present.Resize(id, size)
		}
	case params.BaseImage != "":
		img, ierr := d.images.Get(params.BaseImage)
		if ierr != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "base image %q is not in the image store of node %s (csi-rawcow image import): %v", truncate(params.BaseImage), d.cfg.NodeID, ierr)
		}
		baseSize := (img.Size + cow.BlockSize - 1) / cow.BlockSize * cow.BlockSize
		if r.GetLimitBytes() > 0 && baseSize > r.GetLimitBytes() {
			return nil, status.Errorf(codes.OutOfRange, "base image %s has %d bytes, more than the limit %d", params.BaseImage, img.Size, r.GetLimitBytes())
		}
		if r.GetRequiredBytes() == 0 || size < baseSize {
			size = baseSize
		}
		err = d.store.Create(id, cow.CreateOptions{Size: size, Base: img.Path, Labels: labels})
	default:
		err = d.store.Create(id, cow.CreateOptions{Size: size, Labels: labels})
	}
	if err != nil {
		return nil, status.Errorf(codeOf(err), "create volume %s: %v", id, err)
	}
	info, err := d.store.Info(id)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	return info, nil
}

// codeOf maps engine errors to gRPC codes.
func codeOf(err error) codes.Code {
	switch {
	case errors.Is(err, cow.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, cow.ErrExists):
		return codes.AlreadyExists
	case errors.Is(err, cow.ErrBusy):
		return codes.FailedPrecondition
	case errors.Is(err, cow.ErrInvalidName), errors.Is(err, cow.ErrInvalidSize):
		return codes.InvalidArgument
	case errors.Is(err, cow.ErrShrink), errors.Is(err, unix.EFBIG):
		return codes.OutOfRange
	case errors.Is(err, unix.ENOSPC):
		return codes.ResourceExhausted
	}
	return codes.Internal
}

// attached returns the attachment of a volume on this node, if any.
func (d *Driver) attached(id string) (blockdev.Attachment, bool, error) {
	as, err := d.present.List()
	if err != nil {
		return blockdev.Attachment{}, false, status.Errorf(codes.Unavailable, "presentation server: %v", err)
	}
	for _, a := range as {
		if a.Name == id {
			return a, true, nil
		}
	}
	return blockdev.Attachment{}, false, nil
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := checkVolumeID(req.VolumeId); err != nil {
		if status.Code(err) == codes.NotFound {
			return &csi.DeleteVolumeResponse{}, nil
		}
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	if _, ok, err := d.attached(req.VolumeId); err != nil {
		return nil, err
	} else if ok {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged on node %s", req.VolumeId, d.cfg.NodeID)
	}
	if err := d.store.DeleteVolume(req.VolumeId); err != nil && !errors.Is(err, cow.ErrNotFound) {
		return nil, status.Errorf(codeOf(err), "delete volume %s: %v", req.VolumeId, err)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if err := checkVolumeID(req.VolumeId); err != nil {
		return nil, err
	}
	if len(req.VolumeCapabilities) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	if _, err := d.existingVolume(req.VolumeId); err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.VolumeCapabilities); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if _, err := parseParams(req.Parameters); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.VolumeContext,
		VolumeCapabilities: req.VolumeCapabilities,
		Parameters:         req.Parameters,
	}}, nil
}

// volumeHealth checks what a volume needs to work: every layer file present, and, when it
// is attached, a live server behind its device. No entry means healthy.
func (d *Driver) volumeHealth(info *cow.Info) *csi.VolumeHealth {
	h := &csi.VolumeHealth{VolumeId: info.Name}
	bad := func(reason, format string, args ...any) {
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: reason, Message: fmt.Sprintf(format, args...)})
	}
	for _, l := range info.Layers {
		if _, err := os.Stat(l.Path); err != nil {
			bad("LayerMissing", "layer %s: %v", l.ID, err)
		}
	}
	if a, ok, err := d.attached(info.Name); err != nil {
		bad("ServerUnreachable", "%v", err)
	} else if ok && a.Stale {
		bad("ServerDied", "%s was served by a server that died; unstage and stage the volume again", a.Device)
	}
	return h
}

func (d *Driver) volumeEntry(info *cow.Info) *csi.ListVolumesResponse_Entry {
	st := &csi.ListVolumesResponse_VolumeStatus{}
	if _, ok, _ := d.attached(info.Name); ok || info.Labels[labelPublishedTo] != "" {
		st.PublishedNodeIds = []string{d.cfg.NodeID}
	}
	return &csi.ListVolumesResponse_Entry{
		Volume: &csi.Volume{VolumeId: info.Name, CapacityBytes: info.Size, AccessibleTopology: d.topology()},
		Status: st,
	}
}

func (d *Driver) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	e := d.volumeEntry(info)
	return &csi.ControllerGetVolumeResponse{Volume: e.Volume, Status: &csi.ControllerGetVolumeResponse_VolumeStatus{
		PublishedNodeIds: e.Status.PublishedNodeIds,
	}}, nil
}

func (d *Driver) ControllerGetVolumeHealth(ctx context.Context, req *csi.ControllerGetVolumeHealthRequest) (*csi.ControllerGetVolumeHealthResponse, error) {
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeHealthResponse{VolumeHealth: d.volumeHealth(info)}, nil
}

func (d *Driver) ControllerListVolumeHealth(ctx context.Context, req *csi.ControllerListVolumeHealthRequest) (*csi.ControllerListVolumeHealthResponse, error) {
	infos, next, err := d.volumePage(req.StartingToken, req.MaxEntries)
	if err != nil {
		return nil, err
	}
	resp := &csi.ControllerListVolumeHealthResponse{NextToken: next}
	for _, info := range infos {
		resp.Entries = append(resp.Entries, d.volumeHealth(info))
	}
	return resp, nil
}

// page returns the slice of names a starting token and a maximum select, and the next token.
func page(names []string, token string, maxEntries int32) ([]string, string, error) {
	if maxEntries < 0 {
		return nil, "", status.Error(codes.InvalidArgument, "max_entries must not be negative")
	}
	start := 0
	if token != "" {
		n, err := strconv.Atoi(token)
		if err != nil || n < 0 || n > len(names) {
			return nil, "", status.Errorf(codes.Aborted, "invalid starting token %q", truncate(token))
		}
		start = n
	}
	end := len(names)
	if maxEntries > 0 && start+int(maxEntries) < end {
		end = start + int(maxEntries)
	}
	next := ""
	if end < len(names) {
		next = strconv.Itoa(end)
	}
	return names[start:end], next, nil
}

// volumePage describes one page of this driver's volumes, and returns the next token.
func (d *Driver) volumePage(token string, maxEntries int32) ([]*cow.Info, string, error) {
	all, err := d.store.Volumes()
	if err != nil {
		return nil, "", status.Errorf(codes.Internal, "list volumes: %v", err)
	}
	names, next, err := page(filterPrefix(all, volumePrefix), token, maxEntries)
	if err != nil {
		return nil, "", err
	}
	var infos []*cow.Info
	for _, name := range names {
		if info, err := d.store.Info(name); err == nil { // else deleted meanwhile
			infos = append(infos, info)
		}
	}
	return infos, next, nil
}

func (d *Driver) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	infos, next, err := d.volumePage(req.StartingToken, req.MaxEntries)
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, info := range infos {
		resp.Entries = append(resp.Entries, d.volumeEntry(info))
	}
	return resp, nil
}

// filterPrefix keeps the engine names this driver made (the image tool may add others).
func filterPrefix(names []string, prefix string) []string {
	out := names[:0:0]
	for _, n := range names {
		if wellFormed(n, prefix) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if t := req.AccessibleTopology; t != nil && len(t.Segments) > 0 && t.Segments[TopologyKey] != d.cfg.NodeID {
		return &csi.GetCapacityResponse{}, nil
	}
	if len(req.VolumeCapabilities) > 0 {
		if err := checkCapabilities(req.VolumeCapabilities); err != nil {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	// Parameters do not change the free space; and refusing a class here would hide its
	// CreateVolume error from users (no capacity, so the scheduler never picks a node).
	var fs unix.Statfs_t
	if err := unix.Statfs(d.store.Dir(), &fs); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", d.store.Dir(), err)
	}
	avail := int64(fs.Bavail) * fs.Bsize
	return &csi.GetCapacityResponse{
		AvailableCapacity: avail,
		MinimumVolumeSize: wrapInt(minVolumeSize),
	}, nil
}

func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	if err := checkVolumeID(req.VolumeId); err != nil {
		return nil, err
	}
	if req.CapacityRange == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity range is required")
	}
	size, err := requestedSize(req.CapacityRange, minVolumeSize, 0)
	if err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	if limit := req.CapacityRange.LimitBytes; limit > 0 && info.Size > limit {
		return nil, status.Errorf(codes.OutOfRange, "volume %s has %d bytes, more than the limit %d; volumes do not shrink", req.VolumeId, info.Size, limit)
	}
	if size > info.Size {
		if err := d.present.Resize(req.VolumeId, size); err != nil {
			return nil, status.Errorf(codeOf(err), "expand %s: %v", req.VolumeId, err)
		}
		info.Size = size
	}
	return &csi.ControllerExpandVolumeResponse{
		CapacityBytes: info.Size,
		// A block volume's loop device takes up the size at once; a file system must grow.
		NodeExpansionRequired: req.VolumeCapability.GetBlock() == nil,
	}, nil
}

func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := required("snapshot name", req.Name, "source volume ID", req.SourceVolumeId); err != nil {
		return nil, err
	}
	if err := checkNameLen(req.Name); err != nil {
		return nil, err
	}
	for k := range req.Parameters {
		if !isSidecarKey(k) {
			return nil, status.Errorf(codes.InvalidArgument, "unknown snapshot parameter %q", truncate(k))
		}
	}
	if err := checkVolumeID(req.SourceVolumeId); err != nil {
		return nil, err
	}
	if !d.servesTopology(req.AccessibilityRequirements) {
		return nil, status.Errorf(codes.ResourceExhausted, "snapshots of node %s's volumes stay on node %s, outside the requested topology", d.cfg.NodeID, d.cfg.NodeID)
	}
	id := snapshotIDFor(req.Name)
	defer d.locks.lock(id)()
	info, err := d.store.Info(id)
	if errors.Is(err, cow.ErrNotFound) {
		unlock := d.locks.lock(req.SourceVolumeId)
		err = d.present.Snapshot(req.SourceVolumeId, id, map[string]string{labelName: req.Name})
		unlock()
		if err != nil {
			return nil, status.Errorf(codeOf(err), "snapshot %s of %s: %v", id, req.SourceVolumeId, err)
		}
		info, err = d.store.Info(id)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "snapshot %s: %v", id, err)
	}
	if info.Source != req.SourceVolumeId {
		return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists for another volume", req.Name)
	}
	return &csi.CreateSnapshotResponse{Snapshot: d.snapshotOf(info)}, nil
}

func isSidecarKey(k string) bool { return len(k) > 19 && k[:19] == "csi.storage.k8s.io/" }

func (d *Driver) snapshotOf(info *cow.Info) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:         info.Name,
		SourceVolumeId:     info.Source,
		GroupSnapshotId:    info.Labels[labelGroup],
		SizeBytes:          info.Size,
		CreationTime:       timestamppb.New(info.Created),
		ReadyToUse:         true,
		AccessibleTopology: d.topology(),
	}
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if err := checkSnapshotID(req.SnapshotId); err != nil {
		if status.Code(err) == codes.NotFound {
			return &csi.DeleteSnapshotResponse{}, nil
		}
		return nil, err
	}
	defer d.locks.lock(req.SnapshotId)()
	if err := d.store.DeleteSnapshot(req.SnapshotId); err != nil && !errors.Is(err, cow.ErrNotFound) {
		return nil, status.Errorf(codeOf(err), "delete snapshot %s: %v", req.SnapshotId, err)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *Driver) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	info, err := d.existingSnapshot(req.SnapshotId)
	if err != nil {
		return nil, err
	}
	return &csi.GetSnapshotResponse{Snapshot: d.snapshotOf(info)}, nil
}

func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	all, err := d.store.Snapshots()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list snapshots: %v", err)
	}
	names := filterPrefix(all, snapshotPrefix)
	if id := req.SnapshotId; id != "" {
		names = names[:0]
		if wellFormed(id, snapshotPrefix) {
			if _, err := d.store.Info(id); err == nil {
				names = []string{id}
			}
		}
	}
	var selected []string
	byName := map[string]*cow.Info{}
	for _, name := range names {
		info, err := d.store.Info(name)
		if err != nil {
			continue // deleted meanwhile
		}
		if req.SourceVolumeId != "" && info.Source != req.SourceVolumeId {
			continue
		}
		selected = append(selected, name)
		byName[name] = info
	}
	pageNames, next, err := page(selected, req.StartingToken, req.MaxEntries)
	if err != nil {
		return nil, err
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, name := range pageNames {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: d.snapshotOf(byName[name])})
	}
	return resp, nil
}

// ControllerModifyVolume changes a volume's mutable parameters: its presentation, used from
// its next NodeStageVolume on (an attached volume keeps its device until it is restaged).
func (d *Driver) ControllerModifyVolume(ctx context.Context, req *csi.ControllerModifyVolumeRequest) (*csi.ControllerModifyVolumeResponse, error) {
	if err := checkVolumeID(req.VolumeId); err != nil {
		return nil, err
	}
	presentation, err := parseMutable(req.MutableParameters)
	if err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	if _, err := d.existingVolume(req.VolumeId); err != nil {
		return nil, err
	}
	if presentation != "" {
		if err := d.store.SetLabels(req.VolumeId, map[string]string{labelPresent: presentation}); err != nil {
			return nil, status.Errorf(codeOf(err), "modify %s: %v", req.VolumeId, err)
		}
	}
	return &csi.ControllerModifyVolumeResponse{}, nil
}
