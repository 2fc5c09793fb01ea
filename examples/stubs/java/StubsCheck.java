// What a Java user writes against the generated stubs (buf generate): it imports package
// com.callout.v1 (java_package, one class per message: java_multiple_files), builds an
// ExecuteHttpActionRequest, round-trips it through the wire format and reads the service
// descriptors that the stubs hand to a channel. It opens no channel (the stub factories are
// only referenced). .ci/stubs.sh compiles and runs it.
import com.callout.v1.DurableActionServiceGrpc;
import com.callout.v1.ExecuteHttpActionRequest;
import com.callout.v1.HttpActionServiceGrpc;
import com.callout.v1.KeyValue;
import com.callout.v1.Timeouts;
import com.google.protobuf.Duration;
import io.grpc.Channel;
import io.grpc.MethodDescriptor;

public final class StubsCheck {
    private StubsCheck() {}

    /** The stubs a caller makes from a channel (compiled, not called here). */
    static HttpActionServiceGrpc.HttpActionServiceBlockingStub blocking(Channel channel) {
        return HttpActionServiceGrpc.newBlockingStub(channel);
    }

    static DurableActionServiceGrpc.DurableActionServiceStub durable(Channel channel) {
        return DurableActionServiceGrpc.newStub(channel);
    }

    public static void main(String[] args) throws Exception {
        ExecuteHttpActionRequest req = ExecuteHttpActionRequest.newBuilder()
                .setMethod("POST")
                .setUrl("http://127.0.0.1:8080/orders")
                .addHeaders(KeyValue.newBuilder().setName("X-Token").setValue("t"))
                .setJson("{\"id\":1}")
                .setTimeouts(Timeouts.newBuilder().setAttempt(Duration.newBuilder().setSeconds(5)))
                .build();
        byte[] wire = req.toByteArray();
        ExecuteHttpActionRequest back = ExecuteHttpActionRequest.parseFrom(wire);
        if (!back.equals(req)) {
            System.err.println("round trip changed the request");
            System.exit(1);
        }
        MethodDescriptor<ExecuteHttpActionRequest, ?> execute = HttpActionServiceGrpc.getExecuteMethod();
        System.out.printf("java: %s round-trips in %d bytes; %s is %s; %s%n",
                back.getDescriptorForType().getFullName(), wire.length,
                execute.getFullMethodName(), execute.getType(),
                DurableActionServiceGrpc.SERVICE_NAME);
    }
}
