// netns-exec NETNS PROGRAM [ARG...]: joins the network namespace NETNS (a bind-mounted /proc/PID/task/TID/ns/net),
// then becomes PROGRAM. The harness mounts it, static, into a container that must share a test process's network
// namespace (harness/fakes/containers.py): Docker can join the host's network or another container's, never a
// namespace a process made with unshare(2). Needs CAP_SYS_ADMIN in the container; standard library only.
package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: netns-exec NETNS-FILE PROGRAM [ARG...]")
		os.Exit(2)
	}
	// A namespace belongs to a thread: join and exec on one and the same thread.
	runtime.LockOSThread()
	fd, err := syscall.Open(os.Args[1], syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		fail(125, "open %s: %v", os.Args[1], err)
	}
	if _, _, errno := syscall.RawSyscall(setnsNumber(), uintptr(fd), syscall.CLONE_NEWNET, 0); errno != 0 {
		fail(125, "setns %s: %v (the container needs CAP_SYS_ADMIN)", os.Args[1], errno)
	}
	syscall.Close(fd)
	program, err := exec.LookPath(os.Args[2])
	if err != nil {
		fail(127, "%v", err)
	}
	err = syscall.Exec(program, os.Args[2:], os.Environ())
	fail(126, "exec %s: %v", program, err)
}

// setns(2) by number: the standard library's syscall package does not name it.
func setnsNumber() uintptr {
	switch runtime.GOARCH {
	case "amd64":
		return 308
	case "arm64", "riscv64", "loong64":
		return 268
	case "386":
		return 346
	case "arm":
		return 375
	case "ppc64le", "ppc64":
		return 350
	case "s390x":
		return 339
	}
	fail(125, "setns: no system call number known for %s", runtime.GOARCH)
	return 0
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, "netns-exec: "+format+"\n", args...)
	os.Exit(code)
}
