{{- define "agentops.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentops.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentops.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "agentops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespaces the controller serves: its own and rbac.watchNamespaces (unique, in order). */}}
{{- define "agentops.namespaces" -}}
{{- $all := list .Release.Namespace -}}
{{- range .Values.rbac.watchNamespaces }}{{ $all = append $all . }}{{ end -}}
{{- $all | uniq | join "," -}}
{{- end -}}

{{/* runner.pod without its empty entries, as JSON: the controller's --runner-pod. */}}
{{- define "agentops.runnerPod" -}}
{{- $pod := dict -}}
{{- range $k, $v := .Values.runner.pod }}{{ if $v }}{{ $_ := set $pod $k $v }}{{ end }}{{ end -}}
{{- $pod | toJson -}}
{{- end -}}
