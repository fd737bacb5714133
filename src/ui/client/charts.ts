// charts.ts: the live charts of the page, drawn by report.html's own chart code (train/report-charts.ts, served as
// assets/report-charts.js): steps on the x axis, tick labels readable for small values (2e-4, not "0").
import type UPlot from "uplot";

/** what assets/report-charts.js defines (see CHARTS_JS in src/train/report-charts.ts) */
interface ReportCharts {
    uPlot: typeof UPlot;
    qloraStepChart(
        element: HTMLElement,
        c: {
            title: string;
            yLabel: string;
            x: number[];
            series: {label: string; color: string; values: (number | null)[]; points?: boolean}[];
            width: number;
            height?: number;
        }
    ): UPlot;
    qloraFormatValue(v: number, digits?: number): string;
}
const page = globalThis as unknown as ReportCharts & {qloraCharts?: Record<string, UPlot>};
/** the charts on the page by name, as report.html keeps them */
const drawn: Record<string, UPlot> = (page.qloraCharts = {});

export const COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f"
];

/** a number for a table or status line, as the report writes it ("–" for none) */
export function formatNumber(v: number | null | undefined): string {
    return v === null || v === undefined || !Number.isFinite(v) ? "–" : page.qloraFormatValue(v);
}

export interface SeriesSpec {
    label: string;
    color: string;
    points?: boolean;
}

export class StepChart {
    private plot: UPlot | null = null;

    constructor(
        /** the chart's name in window.qloraCharts (its uPlot instance, for tests and the console) */
        private readonly id: string,
        private readonly el: HTMLElement,
        private readonly title: string,
        private readonly yLabel: string,
        private series: SeriesSpec[]
    ) {
        el.hidden = true;
    }

    /** the chart's box (a grid cell or the panel), shown, less the panel's padding */
    private width(): number {
        return Math.max(300, Math.min(this.el.clientWidth || 640, 1100));
    }

    /** new data ([steps, ...one array per series]); a change of series draws the chart anew */
    set(data: UPlot.AlignedData, series?: SeriesSpec[]): void {
        const x = data[0] as number[];
        // shown before it is measured: a hidden box has no width
        this.el.hidden = x.length === 0;
        if (series && JSON.stringify(series) !== JSON.stringify(this.series)) {
            this.series = series;
            this.destroy();
        }
        if (this.plot) {
            this.plot.setData(data);
            // the legend follows the newest step, as the report's shows the last one
            if (x.length > 0) this.plot.setLegend({idx: x.length - 1});
            return;
        }
        if (x.length === 0) return;
        this.plot = page.qloraStepChart(this.el, {
            title: this.title,
            yLabel: this.yLabel,
            x,
            series: this.series.map((s, i) => ({...s, values: (data[i + 1] ?? []) as (number | null)[]})),
            width: this.width()
        });
        drawn[this.id] = this.plot;
    }

    destroy(): void {
        this.plot?.destroy();
        this.plot = null;
        delete drawn[this.id];
    }

    /** fits the chart to its box again (the window, or the charts beside it, changed) */
    resize(): void {
        if (!this.plot) return;
        const width = this.width();
        if (Math.abs(width - this.plot.width) > 2) this.plot.setSize({width, height: 220});
    }
}

/** several [steps, values] tables on one x axis (a step missing in a table is a gap) */
export function joinTables(tables: [number[], (number | null)[]][]): UPlot.AlignedData {
    if (tables.length === 0) return [[]];
    return page.uPlot.join(tables as unknown as UPlot.AlignedData[]);
}
