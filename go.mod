module github.com/rawcow/csi-rawcow

go 1.26.8

require (
	github.com/google/btree v1.1.3 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
