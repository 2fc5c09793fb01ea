// Command stubscheck is what a Go user writes against the generated stubs (buf generate): it
// imports package calloutv1 by its go_package path, builds an ExecuteHttpActionRequest,
// round-trips it through the wire format, makes both service clients and registers a server.
// It opens no connection and listens nowhere (the clients get a nil ClientConnInterface and
// are never called; the server is never served).
// .ci/stubs.sh builds and runs it.
package main

import (
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	// No alias: the package name must be calloutv1, as go_package says.
	"callout/gen/go/callout/v1"
)

func main() {
	req := &calloutv1.ExecuteHttpActionRequest{
		Method:   "POST",
		Url:      "http://127.0.0.1:8080/orders",
		Headers:  []*calloutv1.KeyValue{{Name: "X-Token", Value: "t"}},
		Body:     &calloutv1.ExecuteHttpActionRequest_Json{Json: `{"id":1}`},
		Timeouts: &calloutv1.Timeouts{Attempt: durationpb.New(5e9)},
	}
	wire, err := proto.Marshal(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, "marshal:", err)
		os.Exit(1)
	}
	var back calloutv1.ExecuteHttpActionRequest
	if err := proto.Unmarshal(wire, &back); err != nil {
		fmt.Fprintln(os.Stderr, "unmarshal:", err)
		os.Exit(1)
	}
	if !proto.Equal(req, &back) {
		fmt.Fprintln(os.Stderr, "round trip changed the request")
		os.Exit(1)
	}
	var conn grpc.ClientConnInterface
	var _ calloutv1.HttpActionServiceClient = calloutv1.NewHttpActionServiceClient(conn)
	var _ calloutv1.DurableActionServiceClient = calloutv1.NewDurableActionServiceClient(conn)
	srv := grpc.NewServer()
	calloutv1.RegisterHttpActionServiceServer(srv, &httpActions{})
	for name, info := range srv.GetServiceInfo() {
		fmt.Printf("go: %s round-trips in %d bytes; clients made; %s registered (%d methods)\n",
			back.ProtoReflect().Descriptor().FullName(), len(wire), name, len(info.Methods))
	}
}

// httpActions is a server that answers Unimplemented to every call (the embedded type).
type httpActions struct {
	calloutv1.UnimplementedHttpActionServiceServer
}
