// Command pstest-server is a fallback Pub/Sub emulator for machines where the
// google-cloud-cli-pubsub-emulator Debian package cannot be installed: the
// in-memory fake from cloud.google.com/go/pubsub/v2/pstest on a TCP port.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/v2/pstest"
)

func main() {
	host := flag.String("host", "127.0.0.1", "address to bind (only loopback is used)")
	port := flag.Int("port", 18085, "port to listen on")
	flag.Parse()
	if *host != "127.0.0.1" && *host != "localhost" {
		log.Fatalf("refusing to bind %q: only 127.0.0.1 is allowed", *host)
	}
	srv := pstest.NewServerWithPort(*port)
	defer srv.Close()
	// Same readiness line as the Java emulator, so one script waits for both.
	fmt.Printf("[pstest] Server started, listening on %s\n", srv.Addr)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
