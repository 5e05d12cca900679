module github.com/quantlab/quantlab-chaos/tools/netns-exec

go 1.21
