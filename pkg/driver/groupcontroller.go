package driver

import (
	"context"
	"errors"
	"sort"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// A group snapshot is its member snapshots, each labelled with the group's ID: the engine
// takes them at one point in time in one commit (cow.Store.SnapshotGroup), and no second
// record of the group exists to drift from them.
const (
	groupPrefix = "group-"
	labelGroup  = "csi.group"
)

func groupIDFor(name string) string { return deriveID(groupPrefix, name) }

func checkGroupID(id string) error { return checkID(id, groupPrefix, "group snapshot") }

// memberIDFor names the snapshot of volume in group snapshot groupName.
func memberIDFor(groupName, volume string) string { return snapshotIDFor(groupName + "\x00" + volume) }

func (d *Driver) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
		}},
	}}}, nil
}

func (d *Driver) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	if err := required("group snapshot name", req.Name); err != nil {
		return nil, err
	}
	if err := checkNameLen(req.Name); err != nil {
		return nil, err
	}
	if len(req.SourceVolumeIds) == 0 {
		return nil, status.Error(codes.InvalidArgument, "source volume IDs are required")
	}
	for k := range req.Parameters {
		if !isSidecarKey(k) {
			return nil, status.Errorf(codes.InvalidArgument, "unknown group snapshot parameter %q", truncate(k))
		}
	}
	vols := append([]string(nil), req.SourceVolumeIds...)
	sort.Strings(vols)
	for i, v := range vols {
		if err := checkVolumeID(v); err != nil {
			return nil, err
		}
		if i > 0 && vols[i-1] == v {
			return nil, status.Errorf(codes.InvalidArgument, "volume %s appears twice", v)
		}
	}
	id := groupIDFor(req.Name)
	defer d.locks.lock(id)()
	members, err := d.groupMembers(id)
	if err != nil {
		return nil, err
	}
	if len(members) == 0 {
		snaps := make([]string, len(vols))
		for i, v := range vols {
			snaps[i] = memberIDFor(req.Name, v)
		}
		labels := map[string]string{labelName: req.Name, labelGroup: id}
		if err := d.present.SnapshotGroup(vols, snaps, labels); err != nil {
			return nil, status.Errorf(codeOf(err), "group snapshot %s: %v", id, err)
		}
		if members, err = d.groupMembers(id); err != nil {
			return nil, err
		}
	}
	var sources []string
	for _, m := range members {
		sources = append(sources, m.Source)
	}
	sort.Strings(sources)
	if strings.Join(sources, ",") != strings.Join(vols, ",") {
		return nil, status.Errorf(codes.AlreadyExists, "group snapshot %q exists with other volumes", req.Name)
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: d.groupOf(id, members)}, nil
}

// groupMembers returns the snapshots of a group, sorted by ID.
func (d *Driver) groupMembers(id string) ([]*cow.Info, error) {
	names, err := d.store.Snapshots()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list snapshots: %v", err)
	}
	var out []*cow.Info
	for _, n := range filterPrefix(names, snapshotPrefix) {
		info, err := d.store.Info(n)
		if err == nil && info.Labels[labelGroup] == id {
			out = append(out, info)
		}
	}
	return out, nil
}

func (d *Driver) groupOf(id string, members []*cow.Info) *csi.VolumeGroupSnapshot {
	g := &csi.VolumeGroupSnapshot{GroupSnapshotId: id, ReadyToUse: true}
	for _, m := range members {
		g.Snapshots = append(g.Snapshots, d.snapshotOf(m))
		if g.CreationTime == nil || m.Created.Before(g.CreationTime.AsTime()) {
			g.CreationTime = timestamppb.New(m.Created)
		}
	}
	return g
}

// matchMembers checks a request's snapshot IDs, when it gives any, against the group's.
func matchMembers(given []string, members []*cow.Info) error {
	if len(given) == 0 {
		return nil
	}
	have := make([]string, len(members))
	for i, m := range members {
		have[i] = m.Name
	}
	want := append([]string(nil), given...)
	sort.Strings(want)
	if strings.Join(want, ",") != strings.Join(have, ",") {
		return status.Error(codes.InvalidArgument, "the snapshot IDs are not those of the group snapshot")
	}
	return nil
}

// matchRemaining checks a delete's snapshot IDs against what is left of the group: a delete
// cut short (a crash, a failed member) has removed some members, and its retry still names
// them all. Every remaining member must be named, and every named ID that is not one must
// be gone, not a snapshot of something else. A group with no member left is deleted.
func (d *Driver) matchRemaining(given []string, members []*cow.Info) error {
	if len(given) == 0 || len(members) == 0 {
		return nil
	}
	named := map[string]bool{}
	for _, id := range given {
		named[id] = true
	}
	for _, m := range members {
		if !named[m.Name] {
			return status.Errorf(codes.InvalidArgument, "the snapshot IDs do not name member %s of the group snapshot", m.Name)
		}
		delete(named, m.Name)
	}
	for id := range named {
		if checkSnapshotID(id) != nil {
			return status.Errorf(codes.InvalidArgument, "%q is not a snapshot ID", truncate(id))
		}
		if _, err := d.store.Info(id); !errors.Is(err, cow.ErrNotFound) {
			return status.Errorf(codes.InvalidArgument, "snapshot %s is not a member of the group snapshot", id)
		}
	}
	return nil
}

func (d *Driver) GetVolumeGroupSnapshot(ctx context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	if err := checkGroupID(req.GroupSnapshotId); err != nil {
		return nil, err
	}
	members, err := d.groupMembers(req.GroupSnapshotId)
	if err != nil {
		return nil, err
	}
	if len(members) == 0 {
		return nil, status.Errorf(codes.NotFound, "group snapshot %s does not exist", req.GroupSnapshotId)
	}
	if err := matchMembers(req.SnapshotIds, members); err != nil {
		return nil, err
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: d.groupOf(req.GroupSnapshotId, members)}, nil
}

func (d *Driver) DeleteVolumeGroupSnapshot(ctx context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	if err := checkGroupID(req.GroupSnapshotId); err != nil {
		if status.Code(err) == codes.NotFound {
			return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
		}
		return nil, err
	}
	defer d.locks.lock(req.GroupSnapshotId)()
	members, err := d.groupMembers(req.GroupSnapshotId)
	if err != nil {
		return nil, err
	}
	if err := d.matchRemaining(req.SnapshotIds, members); err != nil {
		return nil, err
	}
	for _, m := range members {
		if err := d.store.DeleteSnapshot(m.Name); err != nil && !errors.Is(err, cow.ErrNotFound) {
			return nil, status.Errorf(codeOf(err), "delete snapshot %s: %v", m.Name, err)
		}
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}
