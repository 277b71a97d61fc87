package suite

// The planner against the real control plane: a real Prometheus (the Debian package's binary,
// started here on loopback) scrapes a synthetic deployment this file serves on loopback, and
// the operator — which runs on this host, so the DisaggDeployment's loopback prometheusUrl
// reaches it — must resize the prefill StatefulSet in the API server, and explain itself in
// status, a condition and Events. The step that runs it is in e2e_test.go.

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	promapi "github.com/prometheus/client_golang/api"
	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// plannerDD is the DisaggDeployment the planner step creates (and deletes at its end).
const plannerDD = "planner-e2e"

// The planner's knobs in the step's DisaggDeployment: the shortest interval the CRD allows
// and a short scale-down window, so the whole round trip takes a little over a minute
// (the operator's fixed 60 s cooldown after a change is most of it).
const (
	plannerIntervalS   = 5
	plannerDownWindowS = 10
	plannerTTFTSLOMs   = 500
	plannerITLSLOMs    = 50
	plannerPrefillMax  = 3
)

// The synthetic deployment's shape: 1000-token prompts, 100-token answers, and a prefill
// replica that computes 8000 prompt tokens/s. Decode's step takes 8 ms plus 0.2 ms per
// running sequence, so ITL p90 stays under 20 ms against the 50 ms SLO at any load here.
const (
	inputTokens           = 1000.0
	outputTokens          = 100.0
	prefillReplicaTokensS = 8000.0
	// A prefill worker rejects prompts beyond this queue (its --max-queue), which bounds TTFT.
	maxQueuedPrompts = 30.0
	decodeStepS      = 0.008
	decodeStepPerSeq = 0.0002
	kvBlocksTotal    = 16384
	kvBlocksPerSeq   = 69 // 1100 tokens in 16-token blocks
)

// syntheticDeployment serves the metrics contract's series (docs/metrics.md) of one
// deployment's frontend, prefill and decode pods, with the real processes' names, labels and
// buckets, at /frontend, /prefill and /decode. It is a small queue, not a recording: requests
// arrive at the current rate and the prefill tier computes prefillReplicaTokensS per ready
// replica (what the StatefulSet reports, fed in by the test). Below that capacity TTFT follows
// the single-server queue the planner's model assumes, I / (C − L) per replica; above it
// prompts queue (up to maxQueuedPrompts) and TTFT is a prompt's own prefill plus the queue
// ahead of it. So the latency the planner reads answers to the replicas it sets.
type syntheticDeployment struct {
	mu            sync.Mutex
	requestsPerS  float64
	readyPrefill  int
	backlogTokens float64
	requests      prometheus.Counter
	ttft, itl     prometheus.Observer
	input, output prometheus.Observer
	queue         prometheus.Gauge
	prefillTokens prometheus.Counter
	decodeTokens  prometheus.Counter
	kvUsed        prometheus.Gauge
	addr          string
	server        *http.Server
	done          chan struct{}
}

// The worker's buckets (worker/api/src/metrics.rs), so the quantiles interpolate as they would
// over real pods.
var (
	latencyBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
		0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}
	tokenBuckets = []float64{1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768}
)

// startSyntheticDeployment serves the series on a loopback port, with one ready prefill
// replica until told otherwise.
func startSyntheticDeployment(t *testing.T, requestsPerS float64) *syntheticDeployment {
	t.Helper()
	frontend, prefill, decode := prometheus.NewRegistry(), prometheus.NewRegistry(), prometheus.NewRegistry()
	histogram := func(reg *prometheus.Registry, name string, buckets []float64) prometheus.Observer {
		h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: name, Buckets: buckets}, []string{"model"})
		reg.MustRegister(h)
		return h.WithLabelValues("m")
	}
	workerGauge := func(reg *prometheus.Registry, name, role string) prometheus.Gauge {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: name}, []string{"role"})
		reg.MustRegister(g)
		return g.WithLabelValues(role)
	}
	workerCounter := func(reg *prometheus.Registry, name, role string) prometheus.Counter {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: name}, []string{"role"})
		reg.MustRegister(c)
		return c.WithLabelValues(role)
	}
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tandem_frontend_requests_total", Help: "requests"}, []string{"model", "status"})
	frontend.MustRegister(requests)
	d := &syntheticDeployment{
		requestsPerS:  requestsPerS,
		readyPrefill:  1,
		requests:      requests.WithLabelValues("m", "ok"),
		ttft:          histogram(frontend, "tandem_frontend_time_to_first_token_seconds", latencyBuckets),
		itl:           histogram(frontend, "tandem_frontend_inter_token_latency_seconds", latencyBuckets),
		input:         histogram(frontend, "tandem_frontend_input_tokens", tokenBuckets),
		output:        histogram(frontend, "tandem_frontend_output_tokens", tokenBuckets),
		queue:         workerGauge(prefill, "tandem_worker_queue_depth", "prefill"),
		prefillTokens: workerCounter(prefill, "tandem_worker_prefill_tokens_total", "prefill"),
		decodeTokens:  workerCounter(decode, "tandem_worker_decode_tokens_total", "decode"),
		kvUsed:        workerGauge(decode, "tandem_worker_kv_blocks_used", "decode"),
		done:          make(chan struct{}),
	}
	workerGauge(decode, "tandem_worker_kv_blocks_total", "decode").Set(kvBlocksTotal)

	mux := http.NewServeMux()
	for path, reg := range map[string]*prometheus.Registry{"/frontend": frontend, "/prefill": prefill, "/decode": decode} {
		mux.Handle(path, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.addr = listener.Addr().String()
	d.server = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = d.server.Serve(listener) }()
	go d.run()
	t.Cleanup(d.stop)
	return d
}

// run advances the queue ten times a second, following wall time however late a busy
// machine wakes it. Requests are counted as they arrive: the demand the planner sizes for.
func (d *syntheticDeployment) run() {
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	last := time.Now()
	arrivals := 0.0 // fractional requests carried to the next tick
	for {
		select {
		case <-d.done:
			return
		case now := <-ticker.C:
			dt := now.Sub(last).Seconds()
			last = now
			d.mu.Lock()
			arrivals += d.requestsPerS * dt
			n := math.Floor(arrivals)
			arrivals -= n
			capacity := float64(d.readyPrefill) * prefillReplicaTokensS
			waiting := d.backlogTokens + n*inputTokens
			served := math.Min(waiting, capacity*dt)
			d.backlogTokens = math.Min(waiting-served, maxQueuedPrompts*inputTokens)
			ttft := math.Inf(1)
			queued := math.Floor(d.backlogTokens / inputTokens)
			if capacity > 0 {
				ownPrefill := inputTokens / prefillReplicaTokensS
				worst := ownPrefill + maxQueuedPrompts*inputTokens/capacity
				perReplica := d.requestsPerS * inputTokens / float64(d.readyPrefill)
				if queued == 0 && perReplica < prefillReplicaTokensS {
					ttft = math.Min(inputTokens/(prefillReplicaTokensS-perReplica), worst)
				} else {
					ttft = ownPrefill + d.backlogTokens/capacity
				}
			}
			// Decode generates for what prefill hands it (steady state: all of prefill's
			// throughput). Its step time is affine in the batch and the batch is what
			// Little's law makes of that load: itl = a + b·load·itl.
			prefillRate := capacity
			if d.backlogTokens == 0 {
				prefillRate = math.Min(capacity, d.requestsPerS*inputTokens)
			}
			decodeLoad := prefillRate / inputTokens * outputTokens
			itl := decodeStepS / (1 - decodeStepPerSeq*decodeLoad)
			d.mu.Unlock()
			d.kvUsed.Set(math.Ceil(decodeLoad*itl) * kvBlocksPerSeq)
			for i := 0; i < int(n); i++ {
				d.requests.Inc()
				d.ttft.Observe(ttft)
				d.itl.Observe(itl)
				d.input.Observe(inputTokens)
				d.output.Observe(outputTokens)
			}
			d.queue.Set(queued)
			d.prefillTokens.Add(served)
			d.decodeTokens.Add(served / inputTokens * outputTokens)
		}
	}
}

// setLoad changes the arrival rate from the next tick on.
func (d *syntheticDeployment) setLoad(requestsPerS float64) {
	d.mu.Lock()
	d.requestsPerS = requestsPerS
	d.mu.Unlock()
}

// setReadyPrefill tells the deployment how many prefill replicas serve.
func (d *syntheticDeployment) setReadyPrefill(n int) {
	d.mu.Lock()
	d.readyPrefill = n
	d.mu.Unlock()
}

func (d *syntheticDeployment) stop() {
	select {
	case <-d.done:
	default:
		close(d.done)
		_ = d.server.Close()
	}
}

// prometheusBinary is $TANDEM_PROMETHEUS or `prometheus` on PATH (`make e2e` installs the
// Debian package when it is missing).
func prometheusBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("TANDEM_PROMETHEUS"); bin != "" {
		return bin
	}
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("the planner step needs the `prometheus` binary: `make prometheus-tool` installs the " +
			"Debian package (apt-get install prometheus), or set TANDEM_PROMETHEUS to one")
	}
	return bin
}

// prometheusServer is a real Prometheus on a fixed loopback port, with its TSDB in a
// directory that outlives a restart.
type prometheusServer struct {
	bin, dir, log string
	port          int
	cmd           *exec.Cmd
	exited        chan struct{}
}

func (p *prometheusServer) url() string { return fmt.Sprintf("http://127.0.0.1:%d", p.port) }

// newPrometheus writes a configuration that scrapes the synthetic deployment every second
// with the labels the scrape job in manifests/prometheus/scrape-config.yaml gives real pods:
// namespace, deployment, tier (and pod).
func newPrometheus(t *testing.T, artifacts, namespace, deployment, target string) *prometheusServer {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := listener.Addr().(*net.TCPAddr).Port
	listener.Close()
	dir := t.TempDir()
	var jobs strings.Builder
	for _, tier := range []string{"frontend", "prefill", "decode"} {
		fmt.Fprintf(&jobs, `- job_name: %[1]s
  metrics_path: /%[1]s
  static_configs:
  - targets: ['%[2]s']
    labels: {namespace: %[3]s, deployment: %[4]s, tier: %[1]s, pod: %[4]s-%[1]s-0}
`, tier, target, namespace, deployment)
	}
	config := "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n" + jobs.String()
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &prometheusServer{bin: prometheusBinary(t), dir: dir, log: filepath.Join(artifacts, "prometheus.log"), port: port}
	t.Cleanup(func() { p.stop(t) })
	return p
}

// start runs Prometheus and waits for /-/ready.
func (p *prometheusServer) start(t *testing.T) {
	t.Helper()
	logFile, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(p.bin,
		"--config.file="+filepath.Join(p.dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(p.dir, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", p.port),
		"--log.level=warn",
	)
	p.cmd.Stdout, p.cmd.Stderr = logFile, logFile
	if err := p.cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("starting %s: %v", p.bin, err)
	}
	p.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		_ = cmd.Wait()
		logFile.Close()
		close(exited)
	}(p.cmd, p.exited)
	client := http.Client{Timeout: time.Second}
	eventually(t, 30*time.Second, "Prometheus ready on "+p.url(), func() (bool, string) {
		select {
		case <-p.exited:
			t.Fatalf("prometheus exited at start; see %s", p.log)
		default:
		}
		resp, err := client.Get(p.url() + "/-/ready")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
}

// stop ends Prometheus with SIGTERM (a clean shutdown releases the TSDB lock for a restart).
func (p *prometheusServer) stop(t *testing.T) {
	if p.cmd == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("prometheus ignored SIGTERM for 20s")
	}
}

// value runs an instant query that aggregates to at most one series; NaN when it has none.
func (p *prometheusServer) value(ctx context.Context, query string) (float64, error) {
	client, err := promapi.NewClient(promapi.Config{Address: p.url()})
	if err != nil {
		return math.NaN(), err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	result, _, err := promv1.NewAPI(client).Query(ctx, query, time.Now())
	if err != nil {
		return math.NaN(), err
	}
	vector, ok := result.(model.Vector)
	if !ok {
		return math.NaN(), fmt.Errorf("%s: a %s, not a vector", query, result.Type())
	}
	if len(vector) == 0 {
		return math.NaN(), nil
	}
	return float64(vector[0].Value), nil
}

// tierState is what the cluster says about the planner's work on one tier.
type tierState struct {
	replicas      int32 // the StatefulSet's spec.replicas
	desired       int64 // status.<tier>.desiredReplicas
	lastScaleTime time.Time
	lastScaleWhy  string
	activeStatus  string // the ScalingActive condition
	activeReason  string
	activeMessage string
}

func (e *env) plannerTier(ctx context.Context, tier string) (tierState, error) {
	var s tierState
	sts, err := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, plannerDD+"-"+tier, metav1.GetOptions{})
	if err != nil {
		return s, err
	}
	if sts.Spec.Replicas != nil {
		s.replicas = *sts.Spec.Replicas
	}
	dd, err := e.dyn.Resource(ddGVR).Namespace(e.ns).Get(ctx, plannerDD, metav1.GetOptions{})
	if err != nil {
		return s, err
	}
	s.desired, _, _ = unstructured.NestedInt64(dd.Object, "status", tier, "desiredReplicas")
	s.lastScaleWhy, _, _ = unstructured.NestedString(dd.Object, "status", tier, "lastScaleReason")
	if at, found, _ := unstructured.NestedString(dd.Object, "status", tier, "lastScaleTime"); found {
		if s.lastScaleTime, err = time.Parse(time.RFC3339, at); err != nil {
			return s, fmt.Errorf("status.%s.lastScaleTime %q: %v", tier, at, err)
		}
	}
	s.activeStatus, s.activeReason, s.activeMessage, _ = condition(dd, "ScalingActive")
	return s, nil
}

func (s tierState) String() string {
	return fmt.Sprintf("StatefulSet replicas %d, status desiredReplicas %d, lastScaleTime %s, lastScaleReason %q, ScalingActive=%s (%s: %s)",
		s.replicas, s.desired, s.lastScaleTime.Format(time.RFC3339), s.lastScaleWhy, s.activeStatus, s.activeReason, s.activeMessage)
}

// plannerEvents lists the Events recorded on the planner's DisaggDeployment with a reason.
func (e *env) plannerEvents(ctx context.Context, reason string) ([]corev1.Event, error) {
	list, err := e.kube.CoreV1().Events(e.ns).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + plannerDD + ",reason=" + reason})
	if err != nil {
		return nil, err
	}
	var out []corev1.Event
	for _, ev := range list.Items {
		if ev.InvolvedObject.Kind == "DisaggDeployment" {
			out = append(out, ev)
		}
	}
	return out, nil
}

// eventSaying finds an Event of the planner's deployment with this reason and type whose
// message contains every one of parts.
func (e *env) eventSaying(ctx context.Context, reason, typ string, parts ...string) (bool, string) {
	events, err := e.plannerEvents(ctx, reason)
	if err != nil {
		return false, err.Error()
	}
	var seen []string
	for _, ev := range events {
		seen = append(seen, ev.Type+" "+ev.Message)
		if ev.Type != typ {
			continue
		}
		all := true
		for _, part := range parts {
			all = all && strings.Contains(ev.Message, part)
		}
		if all {
			return true, ""
		}
	}
	return false, fmt.Sprintf("no %s Event %s saying %q; %s Events: %q", typ, reason, parts, reason, seen)
}

// The load of the step. Heavy, 12k prompt tokens/s, overloads one prefill replica (8000
// tokens/s: prompts queue, TTFT p90 ≈ 4.8 s against a 500 ms SLO) and three carry it at
// TTFT p90 ≈ 290 ms; light, 2k tokens/s, leaves one replica at ≈ 170 ms.
const (
	heavyRequestsPerS = 12
	lightRequestsPerS = 2
)

// plannerDrivesReplicas is the planner step: Prometheus shows prefill far too small, the
// operator grows the StatefulSet and says why; Prometheus goes away, the operator holds and
// says why; Prometheus comes back, the grown tier meets the SLO, the load turns light, and
// after the cooldown and the scale-down window the operator shrinks prefill again.
func (e *env) plannerDrivesReplicas(t *testing.T, ctx context.Context, op *operatorProc) {
	synthetic := startSyntheticDeployment(t, heavyRequestsPerS)
	// The synthetic tier serves with as many replicas as the StatefulSet has ready (kwok pods
	// run nothing; this stands in for them).
	feedCtx, stopFeed := context.WithCancel(ctx)
	t.Cleanup(stopFeed)
	go func() {
		for feedCtx.Err() == nil {
			sts, err := e.kube.AppsV1().StatefulSets(e.ns).Get(feedCtx, plannerDD+"-prefill", metav1.GetOptions{})
			if err == nil && sts.Status.ReadyReplicas > 0 {
				synthetic.setReadyPrefill(int(sts.Status.ReadyReplicas))
			}
			select {
			case <-feedCtx.Done():
			case <-time.After(250 * time.Millisecond):
			}
		}
	}()
	prom := newPrometheus(t, e.artifacts, e.ns, plannerDD, synthetic.addr)
	prom.start(t)
	t.Cleanup(func() {
		if t.Failed() {
			e.logPlannerEvents(t)
		}
	})
	selector := fmt.Sprintf(`namespace=%q,deployment=%q`, e.ns, plannerDD)
	// Static targets reach the scrapers a few seconds after Prometheus is ready, and rate()
	// over a window the series do not fill yet reads low (it divides by the whole window):
	// wait until the planner's window (two intervals) shows the real rate, as it would for a
	// deployment that has been serving for a while.
	eventually(t, 45*time.Second, "Prometheus holds a full window of the synthetic deployment", func() (bool, string) {
		rate, err := prom.value(ctx, fmt.Sprintf(`sum(rate(tandem_frontend_requests_total{%s}[%ds]))`, selector, 2*plannerIntervalS))
		return err == nil && rate >= 0.9*heavyRequestsPerS, fmt.Sprintf("request rate %v/s, %v", rate, err)
	})

	created := time.Now().Truncate(time.Second)
	e.applyYAML(t, fmt.Sprintf(`apiVersion: tandem.dev/v1alpha1
kind: DisaggDeployment
metadata: {name: %s, namespace: %s}
spec:
  model: {name: m, source: "pvc://models/m"}
  image: example.com/tandem:1
  prefill: {replicas: 1, gpusPerReplica: 0}
  decode: {replicas: 1, gpusPerReplica: 0}
  autoscaling:
    enabled: true
    prometheusUrl: %s
    intervalSeconds: %d
    slo: {ttftP90Ms: %d, itlP90Ms: %d}
    prefill: {minReplicas: 1, maxReplicas: %d}
    scaleUpStabilizationSeconds: 0
    scaleDownStabilizationSeconds: %d
`, plannerDD, e.ns, prom.url(), plannerIntervalS, plannerTTFTSLOMs, plannerITLSLOMs, plannerPrefillMax, plannerDownWindowS))

	// 1. Up: TTFT p90 several times the SLO with a full queue → the largest step, clamped to
	// maxReplicas, through the scale subresource; status, condition, Event and metric say so.
	var up tierState
	eventually(t, 60*time.Second, "prefill scaled up by the planner", func() (bool, string) {
		var err error
		if up, err = e.plannerTier(ctx, "prefill"); err != nil {
			return false, err.Error()
		}
		return up.replicas == plannerPrefillMax && up.desired == plannerPrefillMax && up.lastScaleWhy != "", up.String()
	})
	t.Logf("scaled up %.1fs after the DisaggDeployment was created: %s", time.Since(created).Seconds(), up.lastScaleWhy)
	scaledUp := fmt.Sprintf("prefill 1->%d", plannerPrefillMax)
	sloPhrase := fmt.Sprintf("vs SLO %dms", plannerTTFTSLOMs)
	for _, part := range []string{scaledUp, "TTFT p90", sloPhrase} {
		if !strings.Contains(up.lastScaleWhy, part) {
			t.Errorf("status.prefill.lastScaleReason %q does not say %q", up.lastScaleWhy, part)
		}
	}
	if up.lastScaleTime.Before(created) || up.lastScaleTime.After(time.Now().Add(time.Second)) {
		t.Errorf("status.prefill.lastScaleTime %s is not the moment it scaled (created %s)", up.lastScaleTime, created)
	}
	if up.activeStatus != "True" || up.activeReason != "Planning" || !strings.Contains(up.activeMessage, "TTFT p90") {
		t.Errorf("ScalingActive after a scale-up: %s", up)
	}
	eventually(t, 15*time.Second, "a Scaled Event explains the scale-up", func() (bool, string) {
		return e.eventSaying(ctx, "Scaled", corev1.EventTypeNormal, scaledUp, "TTFT p90", sloPhrase)
	})
	eventually(t, 15*time.Second, "the operator's planner gauge", func() (bool, string) {
		v, err := op.metric("tandem_planner_desired_replicas", `deployment="`+plannerDD+`"`, `tier="prefill"`)
		return err == nil && v == plannerPrefillMax, fmt.Sprintf("tandem_planner_desired_replicas{tier=prefill} = %v, %v", v, err)
	})
	e.expectDecodeUntouched(t, ctx)

	// 2. Prometheus goes away: no action, and the condition and a Warning Event say why. The
	// tier stays where the planner put it, neither at its minimum nor at spec.prefill.replicas.
	prom.stop(t)
	stopped := time.Now()
	var held tierState
	eventually(t, 4*plannerIntervalS*time.Second, "ScalingActive=False, PrometheusUnavailable", func() (bool, string) {
		var err error
		if held, err = e.plannerTier(ctx, "prefill"); err != nil {
			return false, err.Error()
		}
		return held.activeStatus == "False" && held.activeReason == "PrometheusUnavailable", held.String()
	})
	if !strings.Contains(held.activeMessage, "Prometheus") {
		t.Errorf("the PrometheusUnavailable condition does not name Prometheus: %q", held.activeMessage)
	}
	eventually(t, 15*time.Second, "a Warning Event says Prometheus is unavailable", func() (bool, string) {
		return e.eventSaying(ctx, "PrometheusUnavailable", corev1.EventTypeWarning, "Prometheus")
	})
	refusals := func() float64 {
		v, _ := op.metric("tandem_planner_decisions_total", `deployment="`+plannerDD+`"`, `reason="prometheus_unavailable"`)
		return v
	}
	seen := refusals()
	eventually(t, 3*plannerIntervalS*time.Second, "another planner step refused while Prometheus is down", func() (bool, string) {
		n := refusals()
		return n > seen, fmt.Sprintf("prometheus_unavailable decisions %v (was %v)", n, seen)
	})
	if held, err := e.plannerTier(ctx, "prefill"); err != nil {
		t.Fatal(err)
	} else if held.replicas != plannerPrefillMax || held.desired != plannerPrefillMax || !held.lastScaleTime.Equal(up.lastScaleTime) {
		t.Fatalf("prefill moved while Prometheus was down: %s", held)
	}
	t.Logf("held at %d replicas for %.1fs without Prometheus", plannerPrefillMax, time.Since(stopped).Seconds())

	// 3. Prometheus is back (same TSDB): the planner acts again and reads the grown tier
	// meeting the SLO under the same heavy load.
	prom.start(t)
	eventually(t, 30*time.Second, "the planner reads TTFT p90 under the SLO with the grown tier", func() (bool, string) {
		s, err := e.plannerTier(ctx, "prefill")
		if err != nil {
			return false, err.Error()
		}
		ttft, err := op.metric("tandem_planner_observed_p90_seconds", `deployment="`+plannerDD+`"`, `metric="ttft"`)
		return err == nil && s.activeStatus == "True" && ttft < float64(plannerTTFTSLOMs)/1000,
			fmt.Sprintf("observed TTFT p90 %v s (%v); %s", ttft, err, s)
	})
	if s, err := e.plannerTier(ctx, "prefill"); err != nil {
		t.Fatal(err)
	} else if s.replicas != plannerPrefillMax {
		t.Fatalf("prefill left %d replicas under the load that needs them: %s", plannerPrefillMax, s)
	}

	// 4. The load turns light: once the cooldown and the scale-down window have passed, the
	// planner brings prefill back down in one bounded step, and says why.
	synthetic.setLoad(lightRequestsPerS)
	var down tierState
	eventually(t, 100*time.Second, "prefill scaled down by the planner", func() (bool, string) {
		var err error
		if down, err = e.plannerTier(ctx, "prefill"); err != nil {
			return false, err.Error()
		}
		return down.replicas == 1 && down.desired == 1 && down.lastScaleTime.After(up.lastScaleTime), down.String()
	})
	t.Logf("scaled down %.0fs after the scale-up: %s", down.lastScaleTime.Sub(up.lastScaleTime).Seconds(), down.lastScaleWhy)
	scaledDown := fmt.Sprintf("prefill %d->1", plannerPrefillMax)
	for _, part := range []string{scaledDown, "TTFT p90", "comfortably under"} {
		if !strings.Contains(down.lastScaleWhy, part) {
			t.Errorf("status.prefill.lastScaleReason %q does not say %q", down.lastScaleWhy, part)
		}
	}
	if gap := down.lastScaleTime.Sub(up.lastScaleTime); gap < plannerDownWindowS*time.Second {
		t.Errorf("scaled down %s after scaling up, inside the %ds scale-down window", gap, plannerDownWindowS)
	}
	if down.activeStatus != "True" || down.activeReason != "Planning" {
		t.Errorf("ScalingActive after the scale-down: %s", down)
	}
	eventually(t, 15*time.Second, "a Scaled Event explains the scale-down", func() (bool, string) {
		return e.eventSaying(ctx, "Scaled", corev1.EventTypeNormal, scaledDown, "comfortably under")
	})
	e.expectDecodeUntouched(t, ctx)
	// The StatefulSet's change triggers reconciles that may still read the deployment from
	// before the planner's status write: the record must survive them.
	time.Sleep(2 * time.Second)
	if after, err := e.plannerTier(ctx, "prefill"); err != nil {
		t.Fatal(err)
	} else if !after.lastScaleTime.Equal(down.lastScaleTime) || after.lastScaleWhy != down.lastScaleWhy || after.desired != 1 {
		t.Errorf("the scale-down's record did not stay in status: %s", after)
	}

	stopFeed()
	prom.stop(t)
	synthetic.stop()
	if err := e.dyn.Resource(ddGVR).Namespace(e.ns).Delete(ctx, plannerDD, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// expectDecodeUntouched checks that decode, which has no bounds under autoscaling (so the
// planner reads its latency but never resizes it), kept its one replica and never got a scale
// record.
func (e *env) expectDecodeUntouched(t *testing.T, ctx context.Context) {
	t.Helper()
	decode, err := e.plannerTier(ctx, "decode")
	if err != nil {
		t.Fatal(err)
	}
	if decode.replicas != 1 || decode.desired != 1 || !decode.lastScaleTime.IsZero() {
		t.Errorf("decode, pinned (no autoscaling bounds), changed: %s", decode)
	}
}

// logPlannerEvents prints every Event of the planner's deployment: the planner's reasons for
// each change it made, for a failed run.
func (e *env) logPlannerEvents(t *testing.T) {
	list, err := e.kube.CoreV1().Events(e.ns).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + plannerDD})
	if err != nil {
		t.Logf("events of %s: %v", plannerDD, err)
		return
	}
	sort.Slice(list.Items, func(i, j int) bool {
		return eventTime(list.Items[i]).Before(eventTime(list.Items[j]))
	})
	for _, ev := range list.Items {
		t.Logf("event %s %s %s (x%d): %s", eventTime(ev).Format(time.RFC3339), ev.Type, ev.Reason, max(ev.Count, 1), ev.Message)
	}
}

// eventTime is when an Event happened, whichever API wrote it (events.k8s.io/v1 sets
// eventTime, core/v1 the timestamps).
func eventTime(ev corev1.Event) time.Time {
	if !ev.EventTime.IsZero() {
		return ev.EventTime.Time
	}
	return ev.LastTimestamp.Time
}
