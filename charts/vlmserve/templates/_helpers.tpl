{{/* Names */}}
{{- define "vlmserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vlmserve.runtimeName" -}}
{{- default (include "vlmserve.fullname" .) .Values.servingRuntime.name -}}
{{- end -}}

{{- define "vlmserve.isvcName" -}}
{{- default (include "vlmserve.fullname" .) .Values.inferenceService.name -}}
{{- end -}}

{{- define "vlmserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Accelerator: the extended resource name ("" on CPU), the device flag, the image tag. */}}
{{- define "vlmserve.resourceName" -}}
{{- $t := .Values.accelerator.type -}}
{{- if not (has $t (list "mlu" "gpu" "cpu")) -}}
{{- fail (printf "accelerator.type must be mlu, gpu or cpu, not %q" $t) -}}
{{- end -}}
{{- if .Values.accelerator.resourceName -}}
{{- .Values.accelerator.resourceName -}}
{{- else if eq $t "mlu" -}}
cambricon.com/mlu
{{- else if eq $t "gpu" -}}
nvidia.com/gpu
{{- end -}}
{{- end -}}

{{- define "vlmserve.device" -}}
{{- default (get (dict "mlu" "mlu" "gpu" "cuda" "cpu" "cpu") .Values.accelerator.type) .Values.device -}}
{{- end -}}

{{- define "vlmserve.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.accelerator.type) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* requests/limits: CPU and memory from values, plus the accelerator (requests = limits, as
     Kubernetes requires for extended resources). */}}
{{- define "vlmserve.resources" -}}
{{- $res := deepCopy .Values.resources -}}
{{- $limits := default dict $res.limits -}}
{{- $requests := default dict $res.requests -}}
{{- $name := include "vlmserve.resourceName" . -}}
{{- if $name -}}
{{- $_ := set $limits $name (int .Values.accelerator.count) -}}
{{- $_ := set $requests $name (int .Values.accelerator.count) -}}
{{- end -}}
{{- range $k, $v := .Values.accelerator.extraResources -}}
{{- $_ := set $limits $k $v -}}
{{- $_ := set $requests $k $v -}}
{{- end -}}
{{- toYaml (dict "limits" $limits "requests" $requests) -}}
{{- end -}}

{{/* Annotations telling KServe that the resource is an accelerator (a JSON list). */}}
{{- define "vlmserve.gpuResourceTypes" -}}
{{- $name := include "vlmserve.resourceName" . -}}
{{- if and $name .Values.accelerator.annotateGpuResourceTypes -}}
serving.kserve.io/gpu-resource-types: {{ list $name | toJson | squote }}
{{- end -}}
{{- end -}}

{{- define "vlmserve.scrapeAnnotations" -}}
{{- if .Values.monitoring.scrapeAnnotations -}}
prometheus.kserve.io/port: {{ .Values.ports.http | quote }}
prometheus.kserve.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* The container's arguments: KServe fills {{.Name}} with the InferenceService's name. */}}
{{- define "vlmserve.args" -}}
- --model_name={{ "{{.Name}}" }}
- --model_dir=/mnt/models
- --http_port={{ .Values.ports.http }}
- --grpc_port={{ .Values.ports.grpc }}
- --device={{ include "vlmserve.device" . }}
- --graceful_shutdown_timeout={{ .Values.gracefulShutdownSeconds }}
{{- range $key, $value := .Values.engineArgs }}
{{- if kindIs "bool" $value }}
{{- if $value }}
- --{{ $key }}
{{- end }}
{{- else if kindIs "slice" $value }}
- --{{ $key }}
{{- range $value }}
- {{ . | toString | quote }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
- --{{ $key }}={{ $value }}
{{- end }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "vlmserve.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "vlmserve.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "vlmserve.probe" -}}
httpGet:
  path: {{ .probe.path }}
  port: {{ .port }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end -}}

{{/* The predictor pod selector for monitors. */}}
{{- define "vlmserve.podSelector" -}}
{{- if .Values.inferenceService.enabled -}}
serving.kserve.io/inferenceservice: {{ include "vlmserve.isvcName" . }}
{{- else -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- end -}}
