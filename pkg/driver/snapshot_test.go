package driver

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// csiClients connects to a test driver.
type csiClients struct {
	csi.ControllerClient
	csi.NodeClient
	csi.GroupControllerClient
}

func dialDriver(t testing.TB, td *testDriver) csiClients {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+td.endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csiClients{csi.NewControllerClient(conn), csi.NewNodeClient(conn), csi.NewGroupControllerClient(conn)}
}

var blockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

func wantCode(t testing.TB, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %s", err, code)
	}
}

// createStaged creates a block volume (optionally from a snapshot) and stages it; cleanup
// unstages and deletes it.
func createStaged(t testing.TB, c csiClients, td *testDriver, name string, src *csi.VolumeContentSource) (id, dev string) {
	t.Helper()
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{blockCap},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeContentSource: src})
	if err != nil {
		t.Fatal(err)
	}
	id = v.Volume.VolumeId
	staging := filepath.Join(td.root, "staging-"+name)
	if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Error(err)
		}
		if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Error(err)
		}
	})
	a, ok, err := td.d.attached(id)
	if err != nil || !ok {
		t.Fatalf("%s is not attached after staging: %v", id, err)
	}
	return id, a.Device
}

// TestSnapshotTopology: a snapshot reports its node, equal (proto.Equal) to the node's
// topology, and refuses requirements that exclude its node.
func TestSnapshotTopology(t *testing.T) {
	td := startDriver(t)
	c := dialDriver(t, td)
	ctx := context.Background()
	info, err := td.d.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := createStaged(t, c, td, "topo", nil)
	snap, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "topo-snap", SourceVolumeId: id,
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{info.AccessibleTopology}}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId})
	topo := snap.Snapshot.AccessibleTopology
	if len(topo) != 1 || !proto.Equal(topo[0], info.AccessibleTopology) {
		t.Fatalf("snapshot topology %v, want exactly the node's %v", topo, info.AccessibleTopology)
	}
	_, err = c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "elsewhere", SourceVolumeId: id,
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "other-node"}}}}})
	wantCode(t, err, codes.ResourceExhausted)
}

// TestGroupSnapshot: a group snapshot of two busy volumes holds both at one point in time;
// restores of its members read exactly that; the group can be listed and deleted whole.
func TestGroupSnapshot(t *testing.T) {
	td := startDriver(t)
	c := dialDriver(t, td)
	ctx := context.Background()
	a, devA := createStaged(t, c, td, "disk-a", nil)
	b, devB := createStaged(t, c, td, "disk-b", nil)
	before := bytes.Repeat([]byte("before "), 4096)
	testsrv.WriteDevice(t, devA, before, 0)
	testsrv.WriteDevice(t, devB, before, 1<<20)
	g, err := c.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "vm-1", SourceVolumeIds: []string{b, a}})
	if err != nil {
		t.Fatal(err)
	}
	after := bytes.Repeat([]byte("after! "), 4096)
	testsrv.WriteDevice(t, devA, after, 0)
	testsrv.WriteDevice(t, devB, after, 1<<20)
	if len(g.GroupSnapshot.Snapshots) != 2 {
		t.Fatalf("group has %d snapshots", len(g.GroupSnapshot.Snapshots))
	}
	again, err := c.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "vm-1", SourceVolumeIds: []string{a, b}})
	if err != nil || !proto.Equal(again.GroupSnapshot, g.GroupSnapshot) {
		t.Fatalf("repeated create: %v, %v", err, again)
	}
	_, err = c.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "vm-1", SourceVolumeIds: []string{a}})
	wantCode(t, err, codes.AlreadyExists)
	offsets := map[string]int64{a: 0, b: 1 << 20}
	var ids []string
	for _, s := range g.GroupSnapshot.Snapshots {
		if s.GroupSnapshotId != g.GroupSnapshot.GroupSnapshotId {
			t.Errorf("member %s has group %q", s.SnapshotId, s.GroupSnapshotId)
		}
		ids = append(ids, s.SnapshotId)
		_, dev := createStaged(t, c, td, "restore-"+s.SnapshotId, &csi.VolumeContentSource{
			Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}})
		if got := testsrv.ReadDevice(t, dev, offsets[s.SourceVolumeId], int64(len(before))); !bytes.Equal(got, before) {
			t.Errorf("restore of %s's member does not hold the data at the group snapshot", s.SourceVolumeId)
		}
	}
	got, err := c.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId, SnapshotIds: ids})
	if err != nil || len(got.GroupSnapshot.Snapshots) != 2 {
		t.Fatalf("get group: %v %v", err, got)
	}
	_, err = c.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId, SnapshotIds: ids[:1]})
	wantCode(t, err, codes.InvalidArgument)
	// A delete cut short after its first member (a crash): the retry names both and must
	// finish the job; naming a snapshot outside the group is still refused.
	if err := td.d.store.DeleteSnapshot(ids[0]); err != nil {
		t.Fatal(err)
	}
	other, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "not-in-group", SourceVolumeId: a})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId,
		SnapshotIds: []string{other.Snapshot.SnapshotId, ids[1]}})
	wantCode(t, err, codes.InvalidArgument)
	if _, err := c.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId, SnapshotIds: ids}); err != nil {
		t.Fatalf("retry of a delete cut short: %v", err)
	}
	if _, err := td.d.store.Info(ids[1]); !errors.Is(err, cow.ErrNotFound) {
		t.Fatalf("the group's last member survived its delete: %v", err)
	}
	_, err = c.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId})
	wantCode(t, err, codes.NotFound)
}

// TestIncompatibleRepeat: staging or publishing again with another read-only mode fails with
// AlreadyExists (the CSI spec's "published but incompatible"); the same request again is OK.
func TestIncompatibleRepeat(t *testing.T) {
	td := startDriver(t)
	c := dialDriver(t, td)
	ctx := context.Background()
	id, _ := createStaged(t, c, td, "modes", nil)
	roCap := proto.Clone(blockCap).(*csi.VolumeCapability)
	roCap.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	staging := filepath.Join(td.root, "staging-modes")
	_, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: roCap})
	wantCode(t, err, codes.AlreadyExists)
	target := filepath.Join(td.root, "pod", "modes")
	publish := func(readOnly bool) error {
		_, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: blockCap, Readonly: readOnly})
		return err
	}
	if err := publish(true); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Error(err)
		}
	}()
	if err := publish(true); err != nil {
		t.Fatalf("the same publish again: %v", err)
	}
	wantCode(t, publish(false), codes.AlreadyExists)
}
