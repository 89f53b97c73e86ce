package driver

import (
	"context"
	"errors"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// A volume lives on one node, so publishing it means: checking that the CO asks for that
// node, within the node's attach limit and in a compatible mode, and remembering it (in the
// volume's labels, so it survives restarts). Kubernetes skips this step (the CSIDriver
// object says attachRequired: false); COs that always attach, Nomad's for one, learn here
// that the volume cannot go anywhere else.
const (
	labelPublishedTo = "csi.publishedTo"
	labelPublishedRO = "csi.publishedReadonly"
)

func (d *Driver) ControllerPublishVolume(ctx context.Context, req *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	if err := checkVolumeID(req.VolumeId); err != nil {
		return nil, err
	}
	if err := required("node ID", req.NodeId); err != nil {
		return nil, err
	}
	if err := checkCapability(req.VolumeCapability); err != nil {
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	info, err := d.existingVolume(req.VolumeId)
	if err != nil {
		return nil, err
	}
	if req.NodeId != d.cfg.NodeID {
		return nil, status.Errorf(codes.NotFound, "node %q does not hold volume %s (it lives on node %s)", truncate(req.NodeId), req.VolumeId, d.cfg.NodeID)
	}
	readOnly := strconv.FormatBool(req.Readonly)
	if to := info.Labels[labelPublishedTo]; to != "" {
		if info.Labels[labelPublishedRO] != readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s is published to %s with readonly=%s", req.VolumeId, to, info.Labels[labelPublishedRO])
		}
		return &csi.ControllerPublishVolumeResponse{}, nil
	}
	if d.cfg.MaxVolumes > 0 {
		n, err := d.publishedCount()
		if err != nil {
			return nil, err
		}
		if int64(n) >= d.cfg.MaxVolumes {
			return nil, status.Errorf(codes.ResourceExhausted, "node %s has %d volumes published, its limit", d.cfg.NodeID, n)
		}
	}
	if err := d.store.SetLabels(req.VolumeId, map[string]string{labelPublishedTo: req.NodeId, labelPublishedRO: readOnly}); err != nil {
		return nil, status.Errorf(codeOf(err), "publish %s: %v", req.VolumeId, err)
	}
	return &csi.ControllerPublishVolumeResponse{}, nil
}

// publishedCount counts this node's published volumes.
func (d *Driver) publishedCount() (int, error) {
	names, err := d.store.Volumes()
	if err != nil {
		return 0, status.Errorf(codes.Internal, "list volumes: %v", err)
	}
	n := 0
	for _, name := range filterPrefix(names, volumePrefix) {
		if info, err := d.store.Info(name); err == nil && info.Labels[labelPublishedTo] != "" {
			n++
		}
	}
	return n, nil
}

func (d *Driver) ControllerUnpublishVolume(ctx context.Context, req *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error) {
	if err := checkVolumeID(req.VolumeId); err != nil {
		if status.Code(err) == codes.NotFound {
			return &csi.ControllerUnpublishVolumeResponse{}, nil // nothing to unpublish
		}
		return nil, err
	}
	defer d.locks.lock(req.VolumeId)()
	err := d.store.SetLabels(req.VolumeId, map[string]string{labelPublishedTo: "", labelPublishedRO: ""})
	if err != nil && !errors.Is(err, cow.ErrNotFound) {
		return nil, status.Errorf(codeOf(err), "unpublish %s: %v", req.VolumeId, err)
	}
	return &csi.ControllerUnpublishVolumeResponse{}, nil
}
