// Command netns-forward copies TCP connections between two network namespaces of the local
// cluster: it listens on an address in one namespace and, for each connection, dials an address
// in another. This is how the node's network namespace (kubelet, Pods) reaches the API server on
// the machine's loopback, and how tests reach a Pod: every byte stays on a loopback interface or
// inside a namespace the local cluster created.
//
//	netns-forward [-listen-netns PATH] -listen ADDR [-to-netns PATH] -to ADDR
//
// An empty namespace path means the namespace netns-forward was started in. It prints
// "listening on ADDR" once it accepts connections, and runs until it is signalled.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on an OS thread switched into the network namespace at path (as the sockets
// fn creates belong to the namespace of the thread that creates them). The thread is never
// unlocked, so Go discards it when the calling goroutine ends instead of reusing it elsewhere.
func inNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open %s: %w", path, err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func main() {
	listenNetns := flag.String("listen-netns", "", "network namespace (a file such as /run/netns/NAME) to listen in")
	listenAddr := flag.String("listen", "", "address to listen on, host:port")
	toNetns := flag.String("to-netns", "", "network namespace to dial in")
	toAddr := flag.String("to", "", "address to forward to, host:port")
	flag.Parse()
	if *listenAddr == "" || *toAddr == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	var listener net.Listener
	err := inNetns(*listenNetns, func() (err error) {
		listener, err = net.Listen("tcp", *listenAddr)
		return err
	})
	if err != nil {
		log.Fatalf("netns-forward: listen: %v", err)
	}
	fmt.Printf("listening on %s\n", listener.Addr())
	for {
		client, err := listener.Accept()
		if err != nil {
			log.Fatalf("netns-forward: accept: %v", err)
		}
		go forward(client, *toNetns, *toAddr)
	}
}

func forward(client net.Conn, netns, addr string) {
	defer client.Close()
	var server net.Conn
	err := inNetns(netns, func() (err error) {
		server, err = net.Dial("tcp", addr)
		return err
	})
	if err != nil {
		log.Printf("netns-forward: dial %s: %v", addr, err)
		return
	}
	defer server.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if tcp, ok := dst.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
	}
	go pipe(server, client)
	go pipe(client, server)
	wg.Wait()
}
