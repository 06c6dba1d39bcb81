package o2u

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

var submitRequest = &o2uv1.CreateScoringJobRequest{Dataset: &o2uv1.DatasetRef{Uri: "file:///d.npz"}}

func TestSubmitRetriesALateAnswerWithTheSameRequestID(t *testing.T) {
	f := &fakeServer{createDelay: 500 * time.Millisecond}
	client := startFake(t, f, WithCallTimeout(100*time.Millisecond))
	job, err := client.Submit(context.Background(), submitRequest)
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.createIDs) != 2 || f.createIDs[0] != f.createIDs[1] || job.GetRequestId() != f.createIDs[0] {
		t.Fatalf("request ids sent: %v, job's %q", f.createIDs, job.GetRequestId())
	}
}

func TestAFailedSubmitCarriesItsRequestID(t *testing.T) {
	// The caller's own deadline ends the call: nothing is retried past it.
	f := &fakeServer{createDelay: 2 * time.Second}
	client := startFake(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := client.Submit(ctx, submitRequest)
	var submitErr *SubmitError
	if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &submitErr) {
		t.Fatalf("got %v", err)
	}
	f.mu.Lock()
	sent := append([]string(nil), f.createIDs...)
	f.mu.Unlock()
	if fmt.Sprint(sent) != fmt.Sprintf("[%s]", SubmitRequestID(err)) || !uuidV4.MatchString(submitErr.RequestID) {
		t.Fatalf("request id %q, sent %v", SubmitRequestID(err), sent)
	}
	if Code(err) != codes.DeadlineExceeded || status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), submitErr.RequestID) {
		t.Fatalf("code %v / %v, text %q", Code(err), status.Code(err), err)
	}
	// A retry with that id is the same job to the server.
	again := &o2uv1.CreateScoringJobRequest{Dataset: submitRequest.Dataset, RequestId: submitErr.RequestID}
	if job, err := client.Submit(context.Background(), again); err != nil || job.GetRequestId() != submitErr.RequestID {
		t.Fatalf("retry: %v, %v", job, err)
	}

	// Retries spent: the *Error stays reachable.
	down := &fakeServer{createFails: 100}
	_, err = startFake(t, down).Submit(context.Background(), submitRequest)
	if e, ok := AsError(err); !ok || !IsUnavailable(err) || e.Code != codes.Unavailable || SubmitRequestID(err) != down.createIDs[0] {
		t.Fatalf("got %v", err)
	}
	if _, ok := status.FromError(err); !ok || len(down.createIDs) != fastRetries.MaxRetries+1 {
		t.Fatalf("status of %v; %d attempts", err, len(down.createIDs))
	}
}

func TestCallsThatAreSafeToRepeatRetryUnavailable(t *testing.T) {
	methods := []string{"GetScoringJob", "CancelScoringJob", "GetDatasetSummary", "ExportNoiseScores", "ListScoringJobs", "ListNoiseScores", "DeleteScoringJob"}
	f := &fakeServer{failFirst: map[string]int{}, jobs: []*o2uv1.ScoringJob{{JobId: "job-2"}, {JobId: "job-1"}}}
	for i := 1; i <= 3; i++ {
		f.scores = append(f.scores, &o2uv1.NoiseScore{Rank: int64(i)})
	}
	for _, method := range methods {
		f.failFirst[method] = 2
	}
	client := startFake(t, f)
	ctx := context.Background()
	if job, err := client.Get(ctx, "job-1"); err != nil || job.GetJobId() != "job-1" {
		t.Fatalf("Get: %v %v", job, err)
	}
	if job, err := client.Cancel(ctx, "job-1"); err != nil || job.GetState() != o2uv1.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("Cancel: %v %v", job, err)
	}
	if summary, err := client.Summary(ctx, "job-1"); err != nil || summary.GetNumSamples() != 7 {
		t.Fatalf("Summary: %v %v", summary, err)
	}
	if resp, err := client.Export(ctx, &o2uv1.ExportNoiseScoresRequest{JobId: "job-1", DestinationUri: "file:///x.csv"}); err != nil || resp.GetRowsWritten() != 7 {
		t.Fatalf("Export: %v %v", resp, err)
	}
	var listed int
	if err := client.ListJobs(ctx, o2uv1.JobState_JOB_STATE_UNSPECIFIED, func(*o2uv1.ScoringJob) error { listed++; return nil }); err != nil || listed != 2 {
		t.Fatalf("ListJobs: %d jobs, %v", listed, err)
	}
	if scores, err := client.Scores(ctx, &o2uv1.ListNoiseScoresRequest{JobId: "job-1", PageSize: 2}); err != nil || len(scores) != 3 {
		t.Fatalf("Scores: %v %v", scores, err)
	}
	if err := client.Delete(ctx, "job-1"); !IsUnavailable(err) {
		t.Fatalf("Delete must not be retried: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// Two failures then the answer; ListScoringJobs' second page and ListNoiseScores' second page
	// answer at once; Delete is tried once.
	want := "map[CancelScoringJob:3 DeleteScoringJob:1 ExportNoiseScores:3 GetDatasetSummary:3 GetScoringJob:3 ListNoiseScores:4 ListScoringJobs:4]"
	if fmt.Sprint(f.calls) != want {
		t.Fatalf("calls %v, want %s", f.calls, want)
	}
}

func TestARetriedExportThatFindsItsOwnFileSaysSo(t *testing.T) {
	f := &fakeServer{loseFirst: map[string]int{"ExportNoiseScores": 1}}
	client := startFake(t, f)
	_, err := client.Export(context.Background(), &o2uv1.ExportNoiseScoresRequest{JobId: "job-1", DestinationUri: "file:///x.csv"})
	if !IsAlreadyExists(err) || !strings.Contains(err.Error(), "retried after UNAVAILABLE") {
		t.Fatalf("got %v", err)
	}
}

func TestWatchOfAFinishedJobPastItsLastEventEndsAtOnce(t *testing.T) {
	f := &fakeServer{jobState: o2uv1.JobState_JOB_STATE_SUCCEEDED}
	f.watchScript = func(int, int64, func(int64, o2uv1.JobState) error) error {
		return nil // what the server does when after_sequence is at or past the final event
	}
	client := startFake(t, f)
	last, err := client.Watch(context.Background(), "job-1", 11, func(*o2uv1.JobEvent) error {
		t.Fatal("no event follows the final one")
		return nil
	})
	if err != nil || last != nil {
		t.Fatalf("last %v, err %v", last, err)
	}
	if len(f.watchAfter) != 1 || f.gets != 1 {
		t.Fatalf("%d streams, %d gets: the watch reconnected", len(f.watchAfter), f.gets)
	}
}

func TestServerNameNeedsTLS(t *testing.T) {
	if _, err := Dial("127.0.0.1:1", WithServerName("o2u.internal")); err == nil || !strings.Contains(err.Error(), "not TLS") {
		t.Fatalf("got %v", err)
	}
	client, err := Dial("127.0.0.1:1", WithTLS(""), WithServerName("o2u.internal"))
	if err != nil {
		t.Fatal(err)
	}
	_ = client.Close()
}

func TestKeepaliveIsOnByDefault(t *testing.T) {
	// Fits what the server allows: pings at most every 20 s (more often: GOAWAY too_many_pings).
	if k := defaultOptions().keepalive; k.Time < 20*time.Second || k.Timeout <= 0 || k.Timeout > 20*time.Second {
		t.Fatalf("default keepalive %+v", k)
	}
	if _, err := Dial("127.0.0.1:1", WithKeepalive(time.Second, 0)); err == nil {
		t.Fatal("a keepalive without a timeout must be refused")
	}
}

// freezingProxy forwards TCP connections to upstream until freeze: then the open ones go silent
// both ways while their sockets stay open, as when a peer vanishes without a reset. New
// connections pass.
type freezingProxy struct {
	lis    net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	opened int
	frozen map[int]bool
}

func startFreezingProxy(t *testing.T, upstream string) *freezingProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezingProxy{lis: lis, frozen: map[int]bool{}}
	go func() {
		for {
			down, err := lis.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", upstream)
			if err != nil {
				_ = down.Close()
				continue
			}
			p.mu.Lock()
			n := p.opened
			p.opened++
			p.conns = append(p.conns, down, up)
			p.mu.Unlock()
			go p.pump(down, up, n)
			go p.pump(up, down, n)
		}
	}()
	t.Cleanup(func() {
		_ = lis.Close()
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.conns {
			_ = c.Close()
		}
	})
	return p
}

func (p *freezingProxy) pump(src, dst net.Conn, n int) {
	buf := make([]byte, 32<<10)
	for {
		k, err := src.Read(buf)
		if err != nil {
			return
		}
		p.mu.Lock()
		frozen := p.frozen[n]
		p.mu.Unlock()
		if frozen {
			continue // swallowed
		}
		if _, err := dst.Write(buf[:k]); err != nil {
			return
		}
	}
}

func (p *freezingProxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for n := 0; n < p.opened; n++ {
		p.frozen[n] = true
	}
}

func (p *freezingProxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.opened
}

func TestWatchResumesAfterItsConnectionGoesSilent(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	f := &fakeServer{}
	f.watchScript = func(call int, after int64, send func(int64, o2uv1.JobState) error) error {
		if call == 1 {
			if err := send(1, o2uv1.JobState_JOB_STATE_RUNNING); err != nil {
				return err
			}
			<-release // a long epoch: nothing to send, and the connection goes silent meanwhile
			return nil
		}
		for seq := after + 1; seq <= 3; seq++ {
			state := o2uv1.JobState_JOB_STATE_RUNNING
			if seq == 3 {
				state = o2uv1.JobState_JOB_STATE_SUCCEEDED
			}
			if err := send(seq, state); err != nil {
				return err
			}
		}
		return nil
	}
	addr := serveFake(t, f, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Second, PermitWithoutStream: true}))
	proxy := startFreezingProxy(t, addr)
	// grpc-go pings at most every 10 s; a short timeout keeps the test at about that.
	client := dialFake(t, proxy.lis.Addr().String(), WithKeepalive(10*time.Second, time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var got []int64
	_, err := client.Watch(ctx, "job-1", 0, func(e *o2uv1.JobEvent) error {
		got = append(got, e.GetSequence())
		if len(got) == 1 {
			proxy.freeze()
		}
		return nil
	})
	if err != nil || fmt.Sprint(got) != "[1 2 3]" || proxy.connections() < 2 {
		t.Fatalf("events %v, err %v, connections %d", got, err, proxy.connections())
	}
}
