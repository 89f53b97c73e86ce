package main

import (
	"fmt"
	"os"
)

func imageMain(args []string) int {
	fmt.Fprintln(os.Stderr, "csi-rawcow image: not yet")
	return 2
}
