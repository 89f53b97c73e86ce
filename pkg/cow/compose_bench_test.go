package cow_test

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// BenchmarkCompose measures, on xfs and btrfs, composing a 100 GiB chain of depth 4 whose
// layers hold 10,000 scattered 4 KiB extents each into one file, and a snapshot of the
// composed volume (a FICLONE of its top). Goals: compose < 1 s, snapshot < 100 ms, both
// independent of the volume's size.
//
//	go test -run xxx -bench Compose -benchtime 3x ./pkg/cow
func BenchmarkCompose(b *testing.B) {
	const size, depth, extents = 100 << 30, 4, 10000
	for _, kind := range []string{"xfs", "btrfs"} {
		b.Run(kind, func(b *testing.B) {
			st, err := cow.OpenStore(filepath.Join(testfs.Mount(b, kind, 4<<30), "store"))
			if err != nil {
				b.Fatal(err)
			}
			if err := st.Create("vol", cow.CreateOptions{Size: size}); err != nil {
				b.Fatal(err)
			}
			r := rand.New(rand.NewPCG(1, 2))
			block := make([]byte, cow.BlockSize)
			for l := 0; l < depth; l++ {
				c, err := st.Open("vol", cow.OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				for i := 0; i < extents; i++ {
					if _, err := c.WriteAt(block, r.Int64N(size/cow.BlockSize)*cow.BlockSize); err != nil {
						b.Fatal(err)
					}
				}
				if err := c.Snapshot(fmt.Sprintf("l%d", l), nil); err != nil {
					b.Fatal(err)
				}
				if err := c.Close(); err != nil {
					b.Fatal(err)
				}
			}
			seq := 0 // the framework runs a sub-benchmark more than once: names stay unique
			b.Run("compose", func(b *testing.B) {
				b.StopTimer()
				for i := 0; i < b.N; i++ {
					seq++
					name := fmt.Sprintf("c%d", seq)
					if err := st.Clone("vol", name, nil); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := st.Compose(name); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
				}
			})
			b.Run("snapshot-composed", func(b *testing.B) {
				seq++
				held := fmt.Sprintf("held%d", seq)
				if err := st.Clone("vol", held, nil); err != nil {
					b.Fatal(err)
				}
				release, err := st.Hold(held)
				if err != nil {
					b.Fatal(err)
				}
				defer release()
				if err := st.Compose(held); err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := st.Snapshot(held, fmt.Sprintf("%s-s%d", held, i), nil); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
