module faster-qat.dev/pause

go 1.24
