// Command scatter writes random 4 KiB blocks into a volume of a csi-rawcow store through the
// engine (pkg/cow), for bench/fio.sh to build layers of scattered writes: write, then
// `csi-rawcow image snapshot`, and again.
//
//	scatter --store DIR [--count 1000] [--span 1G] [--seed N] VOLUME
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

func main() {
	store := flag.String("store", "", "store directory")
	count := flag.Int("count", 1000, "number of 4 KiB blocks to write")
	span := flag.Int64("span", 1<<30, "write at random 4 KiB-aligned offsets in [0, span)")
	seed := flag.Uint64("seed", 1, "random seed: the same seed writes the same blocks")
	flag.Parse()
	if *store == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: scatter --store DIR [--count N] [--span BYTES] [--seed N] VOLUME")
		os.Exit(2)
	}
	if err := run(*store, flag.Arg(0), *count, *span, *seed); err != nil {
		fmt.Fprintf(os.Stderr, "scatter: %v\n", err)
		os.Exit(1)
	}
}

func run(dir, volume string, count int, span int64, seed uint64) error {
	st, err := cow.OpenStore(dir)
	if err != nil {
		return err
	}
	c, err := st.Open(volume, cow.OpenOptions{})
	if err != nil {
		return err
	}
	span = min(span, c.Size())
	r := rand.New(rand.NewPCG(seed, 0x5ca7))
	buf := make([]byte, cow.BlockSize)
	for range count {
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		off := r.Int64N(span/cow.BlockSize) * cow.BlockSize
		if _, err := c.WriteAt(buf, off); err != nil {
			c.Close()
			return err
		}
	}
	return c.Close() // flushes
}
