package blockdev_test

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestAttachWhileCollecting attaches volumes on new mounts while the runtime collects
// garbage without pause. An attach opens the volume's FUSE file in the serving process,
// and Go's poller asks the kernel to poll it: unless the server's mount-time probe made the
// kernel stop asking, that FUSE_POLL and a stop-the-world wait for each other (over the
// rings the first attach hung, every time, before the probe existed).
func TestAttachWhileCollecting(t *testing.T) {
	for _, transport := range testsrv.Transports {
		t.Run(transport, func(t *testing.T) {
			var stop atomic.Bool
			var collectors sync.WaitGroup
			defer collectors.Wait()
			defer stop.Store(true)
			for range 2 {
				collectors.Go(func() {
					for !stop.Load() {
						runtime.GC()
					}
				})
			}
			for i := range 5 {
				st := storeWithVolume(t, cow.CreateOptions{Size: 16 << 20})
				srv := testsrv.StartWith(t, st, t.TempDir(), blockdev.Options{Transport: transport})
				stopWatchdog := testsrv.Watchdog(t, srv.MountDir(), 30*time.Second)
				_, err := srv.Attach("vol", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
				stopWatchdog()
				if err != nil {
					t.Fatalf("attach %d: %v", i, err)
				}
				if err := srv.Detach("vol"); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
