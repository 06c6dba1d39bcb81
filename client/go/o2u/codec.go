package o2u

import (
	"fmt"

	protov1 "github.com/golang/protobuf/proto"
	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// protoCodec marshals both protobuf API generations. The generated o2u.v1 messages use the
// google.golang.org/protobuf API; older grpc-go releases (1.33 and the Debian packages built
// on github.com/golang/protobuf 1.3) encode with the old table-driven runtime, which cannot
// decode those messages. Forcing this codec on every call makes the client independent of
// which github.com/golang/protobuf release grpc-go was built against.
type protoCodec struct{}

// codecName keeps the wire content-subtype "proto", so servers see a plain gRPC call.
const codecName = "proto"

func (protoCodec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case protoreflect.ProtoMessage:
		return proto.Marshal(m)
	case protov1.Message:
		return protov1.Marshal(m)
	default:
		return nil, fmt.Errorf("o2u: cannot marshal %T: not a protobuf message", v)
	}
}

func (protoCodec) Unmarshal(data []byte, v interface{}) error {
	switch m := v.(type) {
	case protoreflect.ProtoMessage:
		return proto.Unmarshal(data, m)
	case protov1.Message:
		return protov1.Unmarshal(data, m)
	default:
		return fmt.Errorf("o2u: cannot unmarshal into %T: not a protobuf message", v)
	}
}

// Name implements encoding.Codec.
func (protoCodec) Name() string { return codecName }

// String implements the older grpc.Codec interface, which servers take through grpc.CustomCodec.
func (protoCodec) String() string { return codecName }

// Codec returns the codec the Client forces on every call. Use it with
// grpc.ForceCodec when calling the generated o2uv1 stubs directly on a grpc-go release built
// against github.com/golang/protobuf 1.3, or with grpc.CustomCodec in a Go test server.
func Codec() encoding.Codec { return protoCodec{} }
