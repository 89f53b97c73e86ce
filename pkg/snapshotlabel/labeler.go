// Package snapshotlabel lets a node's csi-snapshotter serve the pre-provisioned
// VolumeSnapshotContents of that node's snapshots.
//
// Snapshots of node-local volumes are taken by a csi-snapshotter on each node
// (--node-deployment, distributed snapshotting): it watches only the contents labelled
// snapshot.storage.kubernetes.io/managed-by=<its node>. snapshot-controller sets that label
// on the contents it creates for dynamic snapshots, but a pre-provisioned content (an
// existing snapshot imported by hand, or restored from a retained content) carries none, so
// no snapshotter would ever serve it. The node that holds the snapshot knows it: it labels
// such contents of its driver whose snapshot handle is in its store.
package snapshotlabel

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// ManagedBy is the label csi-snapshotter --node-deployment selects its contents by.
const ManagedBy = "snapshot.storage.kubernetes.io/managed-by"

var contents = schema.GroupVersionResource{Group: "snapshot.storage.k8s.io", Version: "v1", Resource: "volumesnapshotcontents"}

// Labeler labels the unlabelled VolumeSnapshotContents of Driver whose snapshot handle Owns
// accepts with ManagedBy=Node.
type Labeler struct {
	Client dynamic.Interface
	Driver string
	Node   string
	Owns   func(snapshotID string) bool
	// Resync: how often every unlabelled content is considered again (a failed patch is
	// retried then).
	Resync time.Duration
}

// Run watches the contents until ctx ends.
func (l *Labeler) Run(ctx context.Context) error {
	if l.Resync == 0 {
		l.Resync = time.Minute
	}
	factory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(l.Client, l.Resync, metav1.NamespaceAll,
		func(o *metav1.ListOptions) { o.LabelSelector = "!" + ManagedBy })
	informer := factory.ForResource(contents).Informer()
	consider := func(obj any) {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			l.consider(ctx, u)
		}
	}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    consider,
		UpdateFunc: func(_, obj any) { consider(obj) },
	}); err != nil {
		return fmt.Errorf("watch VolumeSnapshotContents: %w", err)
	}
	klog.InfoS("Labelling pre-provisioned VolumeSnapshotContents of this node's snapshots", "driver", l.Driver, "node", l.Node)
	factory.Start(ctx.Done())
	<-ctx.Done()
	factory.Shutdown()
	return nil
}

func (l *Labeler) consider(ctx context.Context, u *unstructured.Unstructured) {
	driver, _, _ := unstructured.NestedString(u.Object, "spec", "driver")
	handle, _, _ := unstructured.NestedString(u.Object, "spec", "source", "snapshotHandle")
	// (the informer lists only contents without the label)
	if driver != l.Driver || handle == "" || !l.Owns(handle) {
		return
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]string{ManagedBy: l.Node}}})
	if err != nil {
		klog.ErrorS(err, "Label patch")
		return
	}
	if _, err := l.Client.Resource(contents).Patch(ctx, u.GetName(), types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		klog.ErrorS(err, "Labelling a pre-provisioned VolumeSnapshotContent failed; retried at the next resync", "content", u.GetName(), "snapshotID", handle)
		return
	}
	klog.InfoS("Labelled a pre-provisioned VolumeSnapshotContent for this node's csi-snapshotter", "content", u.GetName(), "snapshotID", handle, "node", l.Node)
}
